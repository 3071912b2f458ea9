"""One decoder for Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma2.

The computation is a pure function of a parameter dict (`forward`), with the layers stacked
on a leading axis and run by `jax.lax.scan`: one layer is compiled whatever the depth, remat
wraps the scan body, and per-layer differences (Gemma2's alternating sliding/full attention)
are scanned data, not Python branches. `Decoder` is the Flax NNX module that holds those
parameters (with logical sharding axes as metadata) and calls `forward` under `jax.jit`.

A KV cache (`KVCache`) is an optional input and output of the same forward, so prefill and
decoding reuse the training code path exactly.

Parameter layout (kernels are [in, out], HF stores [out, in]):
    embed [V, H]; lm_head [H, V] (untied only); final_norm [H];
    layers/{attn_norm, mlp_norm, post_attn_norm, post_mlp_norm} [L, H];
    layers/{q [L, H, Hq*D], k, v [L, H, Hkv*D], o [L, Hq*D, H]}, optional *_bias;
    layers/{q_norm, k_norm} [L, D] (Qwen3); layers/{gate, up [L, H, I], down [L, I, H]}.
"""
from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distillm2_jax.models import rope
from distillm2_jax.models.config import ModelConfig

Params = dict[str, Any]
NEG_INF = float(jnp.finfo(jnp.float32).min)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


# ----------------------------------------------------------------------------- parameters

def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """{name: (shape, logical_axes)} for every parameter, nested like the params dict."""
    L, H, I, D = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_heads * D, cfg.num_kv_heads * D
    layers = {
        "attn_norm": ((L, H), ("layers", "norm")),
        "q": ((L, H, q_dim), ("layers", "embed", "heads")),
        "k": ((L, H, kv_dim), ("layers", "embed", "kv_heads")),
        "v": ((L, H, kv_dim), ("layers", "embed", "kv_heads")),
        "o": ((L, q_dim, H), ("layers", "heads", "embed")),
        "mlp_norm": ((L, H), ("layers", "norm")),
        "gate": ((L, H, I), ("layers", "embed", "mlp")),
        "up": ((L, H, I), ("layers", "embed", "mlp")),
        "down": ((L, I, H), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=((L, q_dim), ("layers", "heads")),
                      k_bias=((L, kv_dim), ("layers", "kv_heads")),
                      v_bias=((L, kv_dim), ("layers", "kv_heads")))
    if cfg.o_bias:
        layers["o_bias"] = ((L, H), ("layers", "norm"))
    if cfg.mlp_bias:
        layers.update(gate_bias=((L, I), ("layers", "mlp")), up_bias=((L, I), ("layers", "mlp")),
                      down_bias=((L, H), ("layers", "norm")))
    if cfg.qk_norm:
        layers.update(q_norm=((L, D), ("layers", "head_dim")), k_norm=((L, D), ("layers", "head_dim")))
    if cfg.sandwich_norm:
        layers.update(post_attn_norm=((L, H), ("layers", "norm")), post_mlp_norm=((L, H), ("layers", "norm")))
    specs: dict[str, Any] = {
        "embed": ((cfg.vocab_size, H), ("vocab", "embed")),
        "final_norm": ((H,), ("norm",)),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((H, cfg.vocab_size), ("embed", "vocab"))
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple) and isinstance(x[1], tuple)


def map_specs(fn, specs):
    """Apply fn(path, shape, logical_axes) over a nested spec dict."""
    def walk(node, path):
        if _is_spec(node):
            return fn(path, *node)
        return {k: walk(v, path + (k,)) for k, v in node.items()}
    return walk(specs, ())


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, init_std: float = 0.02) -> Params:
    """Random parameters as HF initialises them (normal(std) kernels, unit norms, zero biases)."""
    specs = param_specs(cfg)
    leaves: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    map_specs(lambda path, shape, axes: leaves.append((path, shape)), specs)
    keys = dict(zip([p for p, _ in leaves], jax.random.split(key, len(leaves))))

    def make(path, shape, axes):
        name = path[-1]
        if name.endswith("norm"):
            return jnp.full(shape, 0.0 if cfg.norm_plus_one else 1.0, dtype)
        if name.endswith("bias"):
            return jnp.zeros(shape, dtype)
        return (init_std * jax.random.normal(keys[path], shape, jnp.float32)).astype(dtype)

    return map_specs(make, specs)


# ----------------------------------------------------------------------------- KV cache

class KVCache(NamedTuple):
    """Keys/values of every layer for `max_length` slots; `valid` marks slots holding tokens."""
    k: jax.Array      # [L, B, S, Hkv, D]
    v: jax.Array      # [L, B, S, Hkv, D]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32: next slot to write (same for all rows)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm in float32; Gemma uses (1 + w) and multiplies in float32, Llama in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def linear(x: jax.Array, p: Params, name: str) -> jax.Array:
    """x @ p[name] (+ bias) (+ LoRA delta when p holds `{name}_lora_a/_lora_b/_lora_scale`).

    LoRA dropout (inverted) applies to the LoRA branch's input when p holds a per-layer
    `lora_dropout_key` and `lora_dropout_rate` (added for training steps only).
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # 2-D matmuls: XLA:CPU is slower on 3-D weight gradients
    y = x @ p[name].astype(x.dtype)
    if f"{name}_lora_a" in p:
        xl = x
        if "lora_dropout_key" in p:
            rate = p["lora_dropout_rate"].astype(jnp.float32)
            key = jax.random.fold_in(p["lora_dropout_key"], LORA_TARGETS.index(name))
            keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
            xl = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
        low = xl @ p[f"{name}_lora_a"].astype(x.dtype)
        y = y + (low @ p[f"{name}_lora_b"].astype(x.dtype)) * p[f"{name}_lora_scale"].astype(x.dtype)
    if f"{name}_bias" in p:
        y = y + p[f"{name}_bias"].astype(x.dtype)
    return y.reshape(*lead, y.shape[-1])


def _activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


# Cache-free (training) attention splits the queries into at most this many causal blocks.
MAX_QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 64


def causal_query_blocks(length: int) -> list[tuple[int, int]]:
    """Static [lo, hi) query blocks of a cache-free forward of `length` tokens.

    Query block [lo, hi) only needs key slots [0, hi) (later slots are masked by causality),
    so n blocks do (n + 1) / 2n of the score/softmax/PV work of one [T, T] block (9/16 at
    n = 8), in smaller score tiles (`benchmarks/decoder_layout.py` times it against the square).
    """
    n = max(1, min(MAX_QUERY_BLOCKS, length // MIN_QUERY_BLOCK))
    size = -(-length // n)
    return [(lo, min(length, lo + size)) for lo in range(0, length, size)]


def _softmax_attention(cfg: ModelConfig, q, k, v, mask, dtype):
    """Heads-first attention: q [B, Hkv, G, T, D], k/v [B, Hkv, S, D], mask [B, T, S]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v)


def _heads_first(cfg: ModelConfig, q, k, v):
    """q [B, T, Hq, D] -> [B, Hkv, G, T, D]; k, v [B, S, Hkv, D] -> [B, Hkv, S, D]."""
    B, T = q.shape[:2]
    Hkv = cfg.num_kv_heads
    qh = q.reshape(B, T, Hkv, cfg.num_heads // Hkv, cfg.head_dim).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _blocked_attention(cfg: ModelConfig, q, k, v, mask, dtype, key_offset: int = 0):
    """Causal attention of T queries in `causal_query_blocks`; returns [B, T, Hq * D].

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; mask [B, T, S]. Query t sits at key slot
    `key_offset + t` and sees no later slot, so query block [lo, hi) reads key slots
    [0, key_offset + hi) only.
    """
    B, T = q.shape[:2]
    qh, kh, vh = _heads_first(cfg, q, k, v)
    out = jnp.concatenate(
        [_softmax_attention(cfg, qh[:, :, :, lo:hi], kh[:, :, :key_offset + hi], vh[:, :, :key_offset + hi],
                            mask[:, lo:hi, :key_offset + hi], dtype)
         for lo, hi in causal_query_blocks(T)], axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * cfg.head_dim)


def _position_qk(cfg: ModelConfig, p: Params, q, k, cos, sin):
    """Qwen3's per-head q/k norms (when configured), then rotary embeddings."""
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps, False)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps, False)
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin)


def attention(cfg: ModelConfig, p: Params, x: jax.Array, cos, sin, mask: jax.Array,
              kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None):
    """Grouped-query attention of x [B, T, H] over T new tokens (and the cached slots).

    mask [B, T, S] is True where query t may attend key slot s. Returns the output and the
    updated (k, v) cache of this layer (or None). Without a cache the queries run in causal
    blocks (`causal_query_blocks`); a query row with no visible key (left padding) then
    averages the values of its block's key range instead of all slots - such rows are
    padding, and no real token attends to them.
    """
    B, T, _ = x.shape
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, p, "q").reshape(B, T, Hq, D)
    k = linear(x, p, "k").reshape(B, T, Hkv, D)
    v = linear(x, p, "v").reshape(B, T, Hkv, D)
    q, k = _position_qk(cfg, p, q, k, cos, sin)
    new_kv = None
    if kv is not None:
        cache_k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
        new_kv = (cache_k, cache_v)
        k, v = cache_k.astype(x.dtype), cache_v.astype(x.dtype)
        qh, kh, vh = _heads_first(cfg, q, k, v)
        out = _softmax_attention(cfg, qh, kh, vh, mask, x.dtype)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq * D)
    else:
        out = _blocked_attention(cfg, q, k, v, mask, x.dtype)
    return linear(out, p, "o"), new_kv


def mlp(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    return linear(_activation(cfg, linear(x, p, "gate")) * linear(x, p, "up"), p, "down")


def _residual_layer(cfg: ModelConfig, p: Params, x, attend):
    """One pre-norm decoder layer around `attend(normed x) -> (output, extra)` (with Gemma2's
    extra post-norms when configured); returns (x, extra)."""
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one
    h, extra = attend(rms_norm(x, p["attn_norm"], eps, plus_one))
    if cfg.sandwich_norm:
        h = rms_norm(h, p["post_attn_norm"], eps, plus_one)
    x = x + h
    h = mlp(cfg, p, rms_norm(x, p["mlp_norm"], eps, plus_one))
    if cfg.sandwich_norm:
        h = rms_norm(h, p["post_mlp_norm"], eps, plus_one)
    return x + h, extra


def block(cfg: ModelConfig, p: Params, x, cos, sin, mask, kv, index):
    """One decoder layer over x [B, T, H] (and this layer's cache); returns (x, new kv)."""
    return _residual_layer(cfg, p, x, lambda h: attention(cfg, p, h, cos, sin, mask, kv, index))


# ----------------------------------------------------------------------------- forward

def _embed(params: Params, cfg: ModelConfig, ids: jax.Array, dtype) -> jax.Array:
    """Token embeddings in the compute dtype (Gemma scales them by sqrt(hidden))."""
    x = jnp.take(params["embed"], ids, axis=0).astype(dtype)
    return x * jnp.asarray(cfg.hidden_size ** 0.5, dtype=dtype) if cfg.embed_scale else x


def _with_remat(body, remat: str):
    """The layer-scan body under the named `REMAT_POLICIES` policy ("none": as is)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat '{remat}' is not one of {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)


def positions_from_mask(attention_mask: jax.Array, offset: jax.Array | None = None) -> jax.Array:
    """Position ids that count only real tokens (left or right padding), as HF generate does."""
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.maximum(pos, 0)


def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
            cache: KVCache | None = None, compute_dtype=None, remat: str = "none"):
    """Final-norm hidden states [B, T, H] (and the updated cache, or None).

    Without a cache, key slots are the T input positions; with one, the T new tokens are
    written at slots [cache.index, cache.index + T) and attend to every valid earlier slot.
    Causality and sliding windows are measured in slots, as HF's masks do.
    """
    B, T = input_ids.shape
    cdt = jnp.dtype(compute_dtype or params["embed"].dtype)
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), bool)
    attention_mask = attention_mask.astype(bool)
    if cache is None:
        if positions is None:
            positions = positions_from_mask(attention_mask)
        key_valid = attention_mask
        q_slot = jnp.arange(T)
        kv, index = None, None
    else:
        if positions is None:
            positions = positions_from_mask(attention_mask, cache.valid.sum(-1).astype(jnp.int32))
        key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
        q_slot = cache.index + jnp.arange(T)
        kv, index = (cache.k, cache.v), cache.index
    k_slot = jnp.arange(key_valid.shape[1])
    distance = q_slot[:, None] - k_slot[None, :]                  # [T, S]
    base_mask = key_valid[:, None, :] & (distance >= 0)[None]     # [B, T, S]

    x = _embed(params, cfg, input_ids, cdt)
    cos, sin = rope.cos_sin(cfg, positions)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)

    def body(x, xs):
        p, window, layer_kv = xs
        in_window = (window == 0) | (distance < window)
        x, new_kv = block(cfg, p, x, cos, sin, base_mask & in_window[None], layer_kv, index)
        return x, new_kv

    x, new_kv = jax.lax.scan(_with_remat(body, remat), x, (params["layers"], windows, kv))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    if cache is None:
        return hidden, None
    new_cache = KVCache(new_kv[0], new_kv[1], key_valid, cache.index + T)
    return hidden, new_cache


def _pair_attention(cfg: ModelConfig, p: Params, x: jax.Array, prompt_len: int, ropes, masks):
    """Attention of `forward_pairs`' packed pairs: x [B, P + 2R, H] -> same shape.

    The prompts attend causally among themselves; each response attends to its pair's prompt
    keys (the same keys serve both responses) and causally to its own keys, never to the other
    response of its pair.
    """
    B, S, _ = x.shape
    P, R = prompt_len, (S - prompt_len) // 2
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads(name, n):
        y = linear(x, p, name).reshape(B, S, n, D)   # one matmul over prompt and response tokens
        return y[:, :P], y[:, P:].reshape(2 * B, R, n, D)

    (qp, qr), (kp, kr), (vp, vr) = heads("q", Hq), heads("k", Hkv), heads("v", Hkv)
    qp, kp = _position_qk(cfg, p, qp, kp, *ropes[0])
    qr, kr = _position_qk(cfg, p, qr, kr, *ropes[1])
    out_p = _blocked_attention(cfg, qp, kp, vp, masks[0], x.dtype)
    k_all = jnp.concatenate([jnp.repeat(kp, 2, axis=0), kr], axis=1)  # [2B, P + R, Hkv, D]
    v_all = jnp.concatenate([jnp.repeat(vp, 2, axis=0), vr], axis=1)
    out_r = _blocked_attention(cfg, qr, k_all, v_all, masks[1], x.dtype, key_offset=P)
    out = jnp.concatenate([out_p, out_r.reshape(B, 2 * R, Hq * D)], axis=1)
    return linear(out, p, "o"), None


def forward_pairs(params: Params, cfg: ModelConfig, prompt_ids: jax.Array, prompt_mask: jax.Array,
                  response_ids: jax.Array, response_mask: jax.Array, *, compute_dtype=None,
                  remat: str = "none"):
    """Final-norm hidden states of B prompts and their 2B responses, each prompt run once.

    prompt_ids/prompt_mask [B, P] are LEFT-padded; response_ids/response_mask [2B, R] are
    right-padded and pair-major: rows 2b and 2b + 1 both continue prompt b (a pair's TGO and SGO
    responses). The result equals `forward` on the 2B rows [prompt | response] at every real
    token - positions count real tokens, and causality and sliding windows are measured on the
    concatenated [P + R] slots, which equal position distances between real tokens - but each
    prompt runs through the layers once per pair instead of twice.

    A pair is packed as one [P + 2R] sequence, so batch-sharded inputs stay shard-local (a pair
    never spans devices) and every linear layer is one matmul over prompt and response tokens.

    Returns (prompt_hidden [B, P, H], response_hidden [2B, R, H], pair-major).
    """
    B, P = prompt_ids.shape
    N, R = response_ids.shape
    if N != 2 * B:
        raise ValueError(f"expected 2 responses per prompt: {B} prompts, {N} responses")
    cdt = jnp.dtype(compute_dtype or params["embed"].dtype)
    pmask, rmask = prompt_mask.astype(bool), response_mask.astype(bool)
    pos_p = positions_from_mask(pmask)
    pos_r = positions_from_mask(rmask, jnp.repeat(pmask.sum(-1).astype(jnp.int32), 2))
    dist_p = jnp.arange(P)[:, None] - jnp.arange(P)[None, :]                   # [P, P]
    dist_r = (P + jnp.arange(R))[:, None] - jnp.arange(P + R)[None, :]         # [R, P + R]
    mask_p = pmask[:, None, :] & (dist_p >= 0)[None]
    mask_r = jnp.concatenate([jnp.repeat(pmask, 2, axis=0), rmask], axis=1)[:, None, :] & (dist_r >= 0)[None]

    H = cfg.hidden_size
    x = jnp.concatenate([_embed(params, cfg, prompt_ids, cdt),
                         _embed(params, cfg, response_ids, cdt).reshape(B, 2 * R, H)], axis=1)
    ropes = (rope.cos_sin(cfg, pos_p), rope.cos_sin(cfg, pos_r))
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)

    def body(x, xs):
        p, window = xs
        win = lambda d: (window == 0) | (d < window)  # noqa: E731
        masks = (mask_p & win(dist_p)[None], mask_r & win(dist_r)[None])
        x, _ = _residual_layer(cfg, p, x, lambda h: _pair_attention(cfg, p, h, P, ropes, masks))
        return x, None

    x, _ = jax.lax.scan(_with_remat(body, remat), x, (params["layers"], windows))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    return hidden[:, :P], hidden[:, P:].reshape(N, R, H)


def output_head(params: Params, cfg: ModelConfig) -> jax.Array:
    """The output projection [H, V'] (V' = the shared vocabulary when `logits_vocab` is set)."""
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return head[:, : cfg.output_vocab]


def logits_from_hidden(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V'] with Gemma2's final soft-cap."""
    head = output_head(params, cfg).astype(hidden.dtype)
    logits = jnp.einsum("...h,hv->...v", hidden, head, preferred_element_type=jnp.float32)
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat"))
def _jit_logits(params, cfg, input_ids, attention_mask, positions, compute_dtype=None, remat="none"):
    hidden, _ = forward(params, cfg, input_ids, attention_mask, positions=positions,
                        compute_dtype=compute_dtype, remat=remat)
    return logits_from_hidden(params, cfg, hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat"))
def _jit_hidden(params, cfg, input_ids, attention_mask, positions, compute_dtype=None, remat="none"):
    return forward(params, cfg, input_ids, attention_mask, positions=positions,
                   compute_dtype=compute_dtype, remat=remat)[0]


# ----------------------------------------------------------------------------- NNX module

class Decoder(nnx.Module):
    """A decoder-only LM whose parameters carry logical sharding axes (`logical_axes` metadata).

    Build it with `models.from_pretrained`, `models.from_config` or from a params dict.
    `model(input_ids, attention_mask=mask)` gives float32 logits [B, T, V'].
    """

    def __init__(self, config: ModelConfig, params: Params, *, hf_config: dict | None = None,
                 compute_dtype=None):
        self.config = config
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name
        self.hf_config_json = json.dumps(hf_config or {}, sort_keys=True)
        specs = param_specs(config)
        self.embed = nnx.Param(params["embed"], logical_axes=specs["embed"][1])
        self.final_norm = nnx.Param(params["final_norm"], logical_axes=specs["final_norm"][1])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"], logical_axes=specs["lm_head"][1])
        missing = set(specs["layers"]) - set(params["layers"])
        extra = set(params["layers"]) - set(specs["layers"])
        if missing or extra:
            raise ValueError(f"params['layers'] does not fit this config: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)} (merge LoRA adapters with lora.merge first)")
        self.layers = nnx.Dict({name: nnx.Param(params["layers"][name], logical_axes=axes)
                                for name, (_, axes) in specs["layers"].items()})

    @property
    def hf_config(self) -> dict:
        """The Hugging Face config (as a dict) this model was built from; used by export."""
        return json.loads(self.hf_config_json)

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the input of `forward`)."""
        out: Params = {"embed": self.embed[...], "final_norm": self.final_norm[...],
                       "layers": {k: v[...] for k, v in self.layers.items()}}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, input_ids, attention_mask=None, *, positions=None, remat: str = "none"):
        """float32 logits [B, T, V'] for token ids [B, T] (mask 1 = token, 0 = padding)."""
        return _jit_logits(self.params(), self.config, jnp.asarray(input_ids),
                           None if attention_mask is None else jnp.asarray(attention_mask),
                           positions, compute_dtype=self.compute_dtype, remat=remat)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, remat: str = "none"):
        """Final-norm hidden states [B, T, H] (for chunked losses that never build [B, T, V])."""
        return _jit_hidden(self.params(), self.config, jnp.asarray(input_ids),
                           None if attention_mask is None else jnp.asarray(attention_mask),
                           positions, compute_dtype=self.compute_dtype, remat=remat)

    def output_head(self) -> jax.Array:
        """The output projection [H, V'] used for logits (tied embeddings transposed)."""
        return output_head(self.params(), self.config)
