"""One decoder for every supported family (docs/models.md: Llama, Mistral, Qwen2/2.5, Qwen3,
Gemma 2/3, OLMo 3, SmolLM3, and the mixture-of-experts families).

The computation is a pure function of a parameter dict (`forward`), with the layers stacked
on a leading axis and run by `jax.lax.scan`: one layer is compiled whatever the depth, remat
wraps the scan body, and per-layer differences (sliding/full attention, Gemma 3's local and
global rope bases, SmolLM3's NoPE layers) are scanned data - a window and a rope index per
layer - not Python branches. `Decoder` is the Flax NNX module that holds those
parameters (with logical sharding axes as metadata) and calls `forward` under `jax.jit`.

A KV cache (`kv_cache.KVCache`) is an optional input and output of the same forward: the
sampler's prefill and decode steps run the training forward's layer (`layer.decoder_layer`),
only over per-layer caches. Modules: `layer` (the layer: norms, projections, MLP, attention
around the cache or not), `attention` (masked softmax attention, causal query blocks),
`kv_cache`, `rope`; this one holds parameters, masks, positions and the layer loops.

Parameter layout (kernels are [in, out], HF stores [out, in]):
    embed [V, H]; lm_head [H, V] (untied only); final_norm [H];
    layers/{attn_norm, mlp_norm, post_attn_norm, post_mlp_norm} [L, H];
    layers/{q [L, H, Hq*D], k, v [L, H, Hkv*D], o [L, Hq*D, H]}, optional *_bias;
    layers/{q_norm, k_norm} [L, D] (Qwen3, Gemma 3; OLMo 3: [L, Hq*D], [L, Hkv*D]);
    layers/sinks [L, Hq] (gpt-oss); layers/{gate, up [L, H, I], down [L, I, H]}.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distillm2_jax.models import kv_cache, rope
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.kv_cache import KVCache
from distillm2_jax.models.attention import MAX_QUERY_BLOCKS
from distillm2_jax.models.layer import decoder_layer, pair_layer, rms_norm

Params = dict[str, Any]

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
    if not cfg.pre_norm:  # OLMo 3: post-norms only
        del layers["attn_norm"], layers["mlp_norm"]
    if cfg.qk_norm and cfg.qk_norm_full:  # OLMo 3: over the whole projection
        layers.update(q_norm=((L, q_dim), ("layers", "heads")), k_norm=((L, kv_dim), ("layers", "kv_heads")))
    elif cfg.qk_norm:
        layers.update(q_norm=((L, D), ("layers", "head_dim")), k_norm=((L, D), ("layers", "head_dim")))
    if cfg.attn_sinks:
        layers["sinks"] = ((L, cfg.num_heads), ("layers", "norm"))
    if cfg.is_moe:
        for dense in ("gate", "up", "down"):
            del layers[dense]
        layers.update(_moe_specs(cfg))
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


def _moe_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The mixture-of-experts leaves that replace gate/up/down (`models.moe`): expert weights
    stacked [L, E, in, out] on a logical "expert" axis, the router [L, H, E]."""
    L, H, E, I = cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    specs: dict[str, Any] = {"router": ((L, H, E), ("layers", "embed", "router"))}
    if cfg.expert_activation == "swiglu_clamped":  # gpt-oss: fused, gate/up interleaved
        specs["expert_gate_up"] = ((L, E, H, 2 * I), ("layers", "expert", "embed", "mlp"))
    else:
        specs.update(expert_gate=((L, E, H, I), ("layers", "expert", "embed", "mlp")),
                     expert_up=((L, E, H, I), ("layers", "expert", "embed", "mlp")))
    specs["expert_down"] = ((L, E, I, H), ("layers", "expert", "mlp", "embed"))
    if cfg.router_bias:
        specs["router_bias"] = ((L, E), ("layers", "router"))
    if cfg.expert_bias:
        specs.update(expert_gate_up_bias=((L, E, 2 * I), ("layers", "expert", "mlp")),
                     expert_down_bias=((L, E, H), ("layers", "expert", "norm")))
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
            cache: KVCache | None = None, compute_dtype=None, remat: str = "none",
            max_query_blocks: int = MAX_QUERY_BLOCKS, flatten_linear: bool = True,
            router_stats: bool = False):
    """Final-norm hidden states [B, T, H] (and the updated cache, or None).

    router_stats (cache-free only): also return the MoE routers' `moe.RouterStats` summed over
    layers and real tokens (None for a dense model): (hidden, None, stats).

    Without a cache, key slots are the T input positions. With one (`init_cache`), row b's T
    new tokens are written at its slots [cache.index[b], cache.index[b] + T) and attend to
    every valid earlier slot (rows may be at different lengths). Either way the stacked layers
    run under one `lax.scan` of `layer.decoder_layer` (the cache rides in the carry), so only
    one layer's weights are ever sliced at a time: decoding holds no second copy of them.
    `remat` applies to the cache-free scan. Causality and sliding windows are measured in
    slots, as HF's masks do.

    `max_query_blocks` and `flatten_linear` change speed, not results (`layer`).
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
    else:
        if positions is None:
            positions = positions_from_mask(attention_mask, cache.valid.sum(-1).astype(jnp.int32))
        key_valid = kv_cache.write_valid(cache.valid, attention_mask, cache.index)
        q_slot = cache.index[:, None] + jnp.arange(T)[None]           # [B, T]: per-row slots
    k_slot = jnp.arange(key_valid.shape[1])
    distance = q_slot[..., :, None] - k_slot                      # [T, S] or [B, T, S]
    base_mask = key_valid[:, None, :] & (distance >= 0)           # [B, T, S]

    x = _embed(params, cfg, input_ids, cdt)
    table = rope.tables(cfg, positions)   # each distinct rope once; a layer picks its own
    tuning = dict(max_query_blocks=max_query_blocks, flatten_linear=flatten_linear)

    if cache is None:
        def body(x, xs):
            p, window, r = xs
            cos, sin = rope.pick(table, r)
            in_window = (window == 0) | (distance < window)
            return decoder_layer(cfg, p, x, cos, sin, base_mask & in_window, **tuning,
                                 token_weight=attention_mask)

        windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)
        x, stats = jax.lax.scan(_with_remat(body, remat), x, (params["layers"], windows, rope.layer_indices(cfg)))
        hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
        if router_stats:
            return hidden, None, _sum_layers(stats)
        return hidden, None

    def cached_body(carry, xs):
        x, ks, vs = carry
        p, window, r, i = xs
        cos, sin = rope.pick(table, r)
        in_window = (window == 0) | (distance < window)
        x, (ks, vs, _) = decoder_layer(cfg, p, x, cos, sin, base_mask & in_window, (ks, vs, i),
                                       cache.index, **tuning)
        return (x, ks, vs), None

    windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)
    (x, ks, vs), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v),
                                  (params["layers"], windows, rope.layer_indices(cfg),
                                                         jnp.arange(cfg.num_layers)))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    return hidden, KVCache(ks, vs, key_valid, cache.index + T)


def forward_pairs(params: Params, cfg: ModelConfig, prompt_ids: jax.Array, prompt_mask: jax.Array,
                  response_ids: jax.Array, response_mask: jax.Array, *, compute_dtype=None,
                  remat: str = "none", max_query_blocks: int = MAX_QUERY_BLOCKS,
                  flatten_linear: bool = True, router_stats: bool = False):
    """Final-norm hidden states of B prompts and their 2B responses, each prompt run once.

    prompt_ids/prompt_mask [B, P] are LEFT-padded; response_ids/response_mask [2B, R] are
    right-padded and pair-major: rows 2b and 2b + 1 both continue prompt b (a pair's TGO and SGO
    responses). The result equals `forward` on the 2B rows [prompt | response] at every real
    token - positions count real tokens, and causality and sliding windows are measured on the
    concatenated [P + R] slots, which equal position distances between real tokens - but each
    prompt runs through the layers once per pair instead of twice.

    A pair is packed as one [P + 2R] sequence, so batch-sharded inputs stay shard-local (a pair
    never spans devices) and every linear layer is one matmul over prompt and response tokens.

    Returns (prompt_hidden [B, P, H], response_hidden [2B, R, H], pair-major), and with
    `router_stats` the MoE routers' `moe.RouterStats` (None if dense) summed over layers and
    the real tokens of the 2B rows [prompt | response] (a prompt token counts twice, as in
    `forward` on those rows).
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
    tables = (rope.tables(cfg, pos_p), rope.tables(cfg, pos_r))
    windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)

    def body(x, xs):
        p, window, r = xs
        ropes = (rope.pick(tables[0], r), rope.pick(tables[1], r))
        win = lambda d: (window == 0) | (d < window)  # noqa: E731
        masks = (mask_p & win(dist_p)[None], mask_r & win(dist_r)[None])
        return pair_layer(cfg, p, x, P, ropes, masks, max_query_blocks=max_query_blocks,
                          flatten_linear=flatten_linear, token_weight=token_weight)

    token_weight = jnp.concatenate([2.0 * pmask, rmask.reshape(B, 2 * R)], axis=1).astype(jnp.float32)
    x, stats = jax.lax.scan(_with_remat(body, remat), x, (params["layers"], windows, rope.layer_indices(cfg)))
    hidden = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    if router_stats:
        return hidden[:, :P], hidden[:, P:].reshape(N, R, H), _sum_layers(stats)
    return hidden[:, :P], hidden[:, P:].reshape(N, R, H)


def _sum_layers(stats):
    """Per-layer router statistics stacked by the layer scan -> summed over layers (None stays)."""
    return None if stats is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)


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
