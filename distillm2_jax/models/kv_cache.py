"""The KV cache of `decoder.forward(..., cache=...)`: one buffer per layer, laid out [B, Hkv, S, D].

Per-layer buffers (not one stacked [L, ...] array under a layer scan) and heads before slots
are what make decoding fast on XLA:CPU: each step updates every layer's buffer in place and
the attention dots read it without a transpose copy (see `sampling.decode`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax import sharding as shd
from distillm2_jax.models.config import ModelConfig

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
    """Keys/values of every layer for `max_length` slots; `valid` marks slots holding tokens."""

    k: tuple[jax.Array, ...]  # L x [B, Hkv, S, D]
    v: tuple[jax.Array, ...]  # L x [B, Hkv, S, D]
    valid: jax.Array          # [B, S] bool
    index: jax.Array          # [] int32: next slot to write (the same for all rows)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32, mesh=None) -> KVCache:
    """An empty cache of `max_length` slots (batch and kv heads sharded on `mesh` inside jit)."""
    shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    zeros = lambda: shd.constrain(jnp.zeros(shape, dtype), CACHE_AXES, mesh)  # noqa: E731
    return KVCache(tuple(zeros() for _ in range(cfg.num_layers)),
                   tuple(zeros() for _ in range(cfg.num_layers)),
                   shd.constrain(jnp.zeros((batch, max_length), bool), ("batch", "length"), mesh),
                   jnp.zeros((), jnp.int32))


def write_layer(k_cache, v_cache, k, v, index):
    """One layer's cache with new keys/values k, v [B, T, Hkv, D] written at slots [index, index + T)."""
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype),
                                           (0, 0, index, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                           (0, 0, index, 0))
    return k_cache, v_cache
