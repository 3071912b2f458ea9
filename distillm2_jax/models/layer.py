"""The decoder layer, shared by training (a layer scan, no cache) and decoding (a KV cache).

    x, _ = layer.decoder_layer(cfg, p, x, cos, sin, mask)                               # training
    x, (k, v, i) = layer.decoder_layer(cfg, p, x, cos, sin, mask, (k, v, i), index)     # prefill/decode

`p` holds one layer's weights (a slice of `params["layers"]`). Without a cache the T tokens
attend to each other in causal query blocks; with the stacked caches k, v [L, B, Hkv, S, D]
and this layer's index i, row b's keys and values are written at layer i's slots
[index[b], index[b] + T) and the tokens attend to that layer's whole cache.
`pair_layer` is the same layer for `decoder.forward_pairs`' packed prompt/response pairs.

Speed-only choices are keyword arguments (`benchmarks/decoder_layout.py` times them):
`max_query_blocks` (1 = one [T, T] square) and `flatten_linear` (False = 3-D matmuls).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from distillm2_jax.models import moe, quant, rope
from distillm2_jax.models.attention import MAX_QUERY_BLOCKS, blocked_attention, cached_attention
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.models.kv_cache import write_layer

Params = dict[str, Any]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm in float32; Gemma uses (1 + w) and multiplies in float32, Llama in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def linear(x: jax.Array, p: Params, name: str, *, flatten: bool = True) -> jax.Array:
    """x @ p[name] (+ bias) (+ LoRA delta when p holds `{name}_lora_a/_lora_b/_lora_scale`).

    LoRA dropout (inverted) applies to the LoRA branch's input when p holds a per-layer
    `lora_dropout_key` and `lora_dropout_rate` (added for training steps only). `flatten`
    multiplies [B*T, in] matrices: XLA:CPU is slower on the 3-D weight gradients of
    [B, T, in] @ W.
    A quantized p[name] (a qwix QArray, or a `{name}_fake_quant` marker beside it) is
    dequantized by `quant.weight` (docs/quantization.md).
    """
    lead = x.shape[:-1]
    if flatten:
        x = x.reshape(-1, x.shape[-1])
    y = x @ quant.weight(p, name, x.dtype)   # dequantized / fake-quantized when quantized
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


def mlp(cfg: ModelConfig, p: Params, x: jax.Array, *, flatten_linear: bool = True) -> jax.Array:
    fl = flatten_linear
    hidden = _activation(cfg, linear(x, p, "gate", flatten=fl)) * linear(x, p, "up", flatten=fl)
    return linear(hidden, p, "down", flatten=fl)


def feed_forward(cfg: ModelConfig, p: Params, x: jax.Array, token_weight: jax.Array | None = None, *,
                 flatten_linear: bool = True):
    """The layer's MLP, or its mixture of experts (`models.moe`); returns (y, the router's
    `moe.RouterStats` over tokens weighted by token_weight [B, T], or None for a dense MLP)."""
    if cfg.is_moe:
        return moe.moe_mlp(cfg, p, x, token_weight)
    return mlp(cfg, p, x, flatten_linear=flatten_linear), None


def _qk_norm(cfg: ModelConfig, x, weight):
    """Per-head RMSNorm of x [B, T, heads, D] (Qwen3, Gemma 3), or over all heads (OLMo 3)."""
    if not cfg.qk_norm_full:
        return rms_norm(x, weight, cfg.rms_norm_eps, cfg.norm_plus_one)
    flat = x.reshape(*x.shape[:-2], -1)
    return rms_norm(flat, weight, cfg.rms_norm_eps, cfg.norm_plus_one).reshape(x.shape)


def position_qk(cfg: ModelConfig, p: Params, q, k, cos, sin):
    """The q/k norms (when configured), then rotary embeddings."""
    if cfg.qk_norm:
        q, k = _qk_norm(cfg, q, p["q_norm"]), _qk_norm(cfg, k, p["k_norm"])
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin)


def self_attention(cfg: ModelConfig, p: Params, x: jax.Array, cos, sin, mask: jax.Array,
                   cache: tuple | None = None, index: jax.Array | None = None, *,
                   max_query_blocks: int = MAX_QUERY_BLOCKS, flatten_linear: bool = True):
    """Grouped-query attention of x [B, T, H]; returns (output [B, T, H], the updated cache or None).

    mask [B, T, S] is True where query t may attend key slot s: S = T without a cache (queries
    in `attention.causal_query_blocks`), S = the cache's slots with one.
    """
    B, T, _ = x.shape
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, p, "q", flatten=flatten_linear).reshape(B, T, Hq, D)
    k = linear(x, p, "k", flatten=flatten_linear).reshape(B, T, Hkv, D)
    v = linear(x, p, "v", flatten=flatten_linear).reshape(B, T, Hkv, D)
    q, k = position_qk(cfg, p, q, k, cos, sin)
    if cache is None:
        out = blocked_attention(cfg, q, k, v, mask, x.dtype, max_query_blocks=max_query_blocks,
                                sinks=p.get("sinks"))
    else:
        k_all, v_all, i = cache
        k_all, v_all = write_layer(k_all, v_all, k, v, index, i)
        out = cached_attention(cfg, q, k_all[i], v_all[i], mask, x.dtype, sinks=p.get("sinks"))
        cache = (k_all, v_all, i)
    return linear(out, p, "o", flatten=flatten_linear), cache


def pair_attention(cfg: ModelConfig, p: Params, x: jax.Array, prompt_len: int, ropes, masks, *,
                   max_query_blocks: int = MAX_QUERY_BLOCKS, flatten_linear: bool = True):
    """Attention of `forward_pairs`' packed pairs: x [B, P + 2R, H] -> (same shape, None).

    The prompts attend causally among themselves; each response attends to its pair's prompt
    keys (the same keys serve both responses) and causally to its own keys, never to the other
    response of its pair. ropes/masks: (prompt, responses) cos/sin and masks.
    """
    B, S, _ = x.shape
    P, R = prompt_len, (S - prompt_len) // 2
    Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def heads(name, n):
        y = linear(x, p, name, flatten=flatten_linear).reshape(B, S, n, D)  # one matmul for all tokens
        return y[:, :P], y[:, P:].reshape(2 * B, R, n, D)

    (qp, qr), (kp, kr), (vp, vr) = heads("q", Hq), heads("k", Hkv), heads("v", Hkv)
    qp, kp = position_qk(cfg, p, qp, kp, *ropes[0])
    qr, kr = position_qk(cfg, p, qr, kr, *ropes[1])
    sinks = p.get("sinks")
    out_p = blocked_attention(cfg, qp, kp, vp, masks[0], x.dtype, max_query_blocks=max_query_blocks,
                              sinks=sinks)
    k_all = jnp.concatenate([jnp.repeat(kp, 2, axis=0), kr], axis=1)  # [2B, P + R, Hkv, D]
    v_all = jnp.concatenate([jnp.repeat(vp, 2, axis=0), vr], axis=1)
    out_r = blocked_attention(cfg, qr, k_all, v_all, masks[1], x.dtype, key_offset=P,
                              max_query_blocks=max_query_blocks, sinks=sinks)
    out = jnp.concatenate([out_p, out_r.reshape(B, 2 * R, Hq * D)], axis=1)
    return linear(out, p, "o", flatten=flatten_linear), None


def _residual(cfg: ModelConfig, p: Params, x, attend, flatten_linear: bool, token_weight=None):
    """A pre-norm layer around `attend(normed x) -> (output, extra)` (with Gemma's extra
    post-norms when configured; OLMo 3: post-norms only); returns (x, extra, router stats or None)."""
    eps, plus_one = cfg.rms_norm_eps, cfg.norm_plus_one

    def pre(h, name):
        return rms_norm(h, p[name], eps, plus_one) if cfg.pre_norm else h

    h, extra = attend(pre(x, "attn_norm"))
    if cfg.sandwich_norm:
        h = rms_norm(h, p["post_attn_norm"], eps, plus_one)
    x = x + h
    h, stats = feed_forward(cfg, p, pre(x, "mlp_norm"), token_weight,
                            flatten_linear=flatten_linear)
    if cfg.sandwich_norm:
        h = rms_norm(h, p["post_mlp_norm"], eps, plus_one)
    return x + h, extra, stats


def decoder_layer(cfg: ModelConfig, p: Params, x: jax.Array, cos, sin, mask: jax.Array,
                  cache: tuple | None = None, index: jax.Array | None = None, *,
                  max_query_blocks: int = MAX_QUERY_BLOCKS, flatten_linear: bool = True,
                  token_weight: jax.Array | None = None):
    """One decoder layer over x [B, T, H] (and the stacked caches with this layer's index, see
    the module doc); returns (x, the updated cache triple) with a cache, else (x, the MoE
    router's `moe.RouterStats` over tokens weighted by token_weight [B, T], or None if dense)."""
    def attend(h):
        return self_attention(cfg, p, h, cos, sin, mask, cache, index,
                              max_query_blocks=max_query_blocks, flatten_linear=flatten_linear)
    x, new_cache, stats = _residual(cfg, p, x, attend, flatten_linear, token_weight)
    return (x, new_cache) if cache is not None else (x, stats)


def pair_layer(cfg: ModelConfig, p: Params, x: jax.Array, prompt_len: int, ropes, masks, *,
               max_query_blocks: int = MAX_QUERY_BLOCKS, flatten_linear: bool = True,
               token_weight: jax.Array | None = None):
    """One decoder layer over `forward_pairs`' packed pairs x [B, P + 2R, H]; returns (x, the
    MoE router's stats over tokens weighted by token_weight [B, P + 2R], or None if dense)."""
    def attend(h):
        return pair_attention(cfg, p, h, prompt_len, ropes, masks,
                              max_query_blocks=max_query_blocks, flatten_linear=flatten_linear)
    x, _, stats = _residual(cfg, p, x, attend, flatten_linear, token_weight)
    return x, stats
