"""Attention math on projected heads: masked softmax attention and its causal query blocks.

No parameters here: `models.layer` projects the tokens, these functions attend. Keys and
values are always heads-first [B, Hkv, S, D] when they meet the queries (the layout of the
sampler's KV cache, `models.kv_cache`); queries come heads-first (the blocked cache-free
path) or tokens-first (cached decoding, which then needs no transpose of q or the output).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distillm2_jax.models.config import ModelConfig

NEG_INF = float(jnp.finfo(jnp.float32).min)

# Default for cache-free attention: split the queries into at most this many causal blocks
# of at least MIN_QUERY_BLOCK // 2 queries.
MAX_QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 64

HEADS_FIRST = "bkgtd"   # q [B, Hkv, G, T, D]
TOKENS_FIRST = "btkgd"  # q [B, T, Hkv, G, D]


def causal_query_blocks(length: int, max_blocks: int = MAX_QUERY_BLOCKS) -> list[tuple[int, int]]:
    """Static [lo, hi) query blocks of a cache-free forward of `length` tokens.

    Query block [lo, hi) only needs key slots [0, hi) (later slots are masked by causality),
    so n blocks do (n + 1) / 2n of the score/softmax/PV work of one [T, T] block (9/16 at
    n = 8), in smaller score tiles (`benchmarks/decoder_layout.py` times it against the square,
    `max_blocks=1`).
    """
    n = max(1, min(max_blocks, length // MIN_QUERY_BLOCK))
    size = -(-length // n)
    return [(lo, min(length, lo + size)) for lo in range(0, length, size)]


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array) -> jax.Array:
    """softmax over the last axis of float32 `scores` [B, Hkv, G, T, S] with one more logit per
    query head, `sinks` [Hkv * G], in the denominator only (gpt-oss' learned attention sinks):
    probabilities over the keys then sum to less than one."""
    _, hkv, g = scores.shape[:3]
    sink = sinks.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def softmax_attention(cfg: ModelConfig, q, k, v, mask, dtype, q_layout: str = HEADS_FIRST, sinks=None):
    """Scaled (soft-capped) masked softmax attention; the output has q's layout.

    q in `q_layout` (HEADS_FIRST or TOKENS_FIRST), k, v [B, Hkv, S, D], mask [B, T, S]
    (True where query t may attend key slot s), sinks [Hq] or None (`softmax_with_sinks`).
    Scores and softmax are float32.
    """
    scores = jnp.einsum(f"{q_layout},bksd->bkgts", q, k, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    else:
        probs = softmax_with_sinks(scores, sinks).astype(dtype)
    return jnp.einsum(f"bkgts,bksd->{q_layout}", probs, v)


def heads_first(cfg: ModelConfig, q, k, v):
    """q [B, T, Hq, D] -> [B, Hkv, G, T, D]; k, v [B, S, Hkv, D] -> [B, Hkv, S, D]."""
    B, T = q.shape[:2]
    Hkv = cfg.num_kv_heads
    qh = q.reshape(B, T, Hkv, cfg.num_heads // Hkv, cfg.head_dim).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def blocked_attention(cfg: ModelConfig, q, k, v, mask, dtype, key_offset: int = 0, *,
                      max_query_blocks: int = MAX_QUERY_BLOCKS, sinks=None):
    """Causal attention of T queries in `causal_query_blocks`; returns [B, T, Hq * D].

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; mask [B, T, S]. Query t sits at key slot
    `key_offset + t` and sees no later slot, so query block [lo, hi) reads key slots
    [0, key_offset + hi) only. A query row with no visible key (left padding) then averages
    the values of its block's key range instead of all slots; such rows are padding, and no
    real token attends to them (with sinks such a row is all zeros).
    """
    B, T = q.shape[:2]
    qh, kh, vh = heads_first(cfg, q, k, v)
    out = jnp.concatenate(
        [softmax_attention(cfg, qh[:, :, :, lo:hi], kh[:, :, :key_offset + hi], vh[:, :, :key_offset + hi],
                           mask[:, lo:hi, :key_offset + hi], dtype, sinks=sinks)
         for lo, hi in causal_query_blocks(T, max_query_blocks)], axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * cfg.head_dim)


def cached_attention(cfg: ModelConfig, q, k_cache, v_cache, mask, dtype, sinks=None):
    """Attention of T new queries q [B, T, Hq, D] over a layer's cache k, v [B, Hkv, S, D].

    One block over all S slots (the mask hides empty and later slots); returns [B, T, Hq * D].
    """
    B, T = q.shape[:2]
    Hkv = cfg.num_kv_heads
    q = q.reshape(B, T, Hkv, cfg.num_heads // Hkv, cfg.head_dim)
    out = softmax_attention(cfg, q, k_cache.astype(dtype), v_cache.astype(dtype), mask, dtype,
                            q_layout=TOKENS_FIRST, sinks=sinks)
    return out.reshape(B, T, cfg.num_heads * cfg.head_dim)
