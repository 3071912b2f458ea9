"""The KV cache of `decoder.forward(..., cache=...)`: keys and values laid out [L, B, Hkv, S, D].

The layers stack on the leading axis like the weights, so the forward's layer scan carries
the cache and updates layer i in place; heads come before slots so that the attention dots
read a layer without a transpose copy (see `sampling.decode`).

Every row has its own write index, so rows of one cache may be at different lengths: the
continuous-batching sampler refills a finished row's slot with a new prompt (`insert_rows`)
while the other rows keep decoding.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax import sharding as shd
from distillm2_jax.models.config import ModelConfig

CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
    """Keys/values of every layer for `max_length` slots; `valid` marks slots holding tokens."""

    k: jax.Array              # [L, B, Hkv, S, D]
    v: jax.Array              # [L, B, Hkv, S, D]
    valid: jax.Array          # [B, S] bool
    index: jax.Array          # [B] int32: each row's next slot to write


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=jnp.float32, mesh=None) -> KVCache:
    """An empty cache of `max_length` slots (batch and kv heads sharded on `mesh` inside jit)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    zeros = lambda: shd.constrain(jnp.zeros(shape, dtype), CACHE_AXES, mesh)  # noqa: E731
    return KVCache(zeros(), zeros(),
                   shd.constrain(jnp.zeros((batch, max_length), bool), ("batch", "length"), mesh),
                   jnp.zeros((batch,), jnp.int32))


def write_valid(valid: jax.Array, mask: jax.Array, index: jax.Array) -> jax.Array:
    """valid [B, S] with each row's new token mask [B, T] written at slots [index[b], index[b] + T)
    (slots past the end are dropped)."""
    B, T = mask.shape
    slots = index[:, None] + jnp.arange(T)[None]
    return valid.at[jnp.arange(B)[:, None], slots].set(mask.astype(valid.dtype), mode="drop")


def write_layer(k_cache, v_cache, k, v, index, layer):
    """The stacked caches [L, B, Hkv, S, D] with layer `layer`'s new keys/values k, v
    [B, T, Hkv, D] written at each row's slots [index[b], index[b] + T): a scatter of the new
    tokens only (slots past the end are dropped), in place inside the layer scan."""
    B, T = k.shape[:2]
    rows, slots = jnp.arange(B)[:, None], index[:, None] + jnp.arange(T)[None]     # [B, 1], [B, T]

    def write(buf, new):  # advanced indices around a slice: the value is laid out [B, T, Hkv, D]
        return buf.at[layer, rows, :, slots, :].set(new.astype(buf.dtype), mode="drop")
    return write(k_cache, k), write(v_cache, v)


def insert_rows(cache: KVCache, rows: KVCache, dest: jax.Array) -> KVCache:
    """`cache` with row j of `rows` (a cache of B' rows and S' <= S slots) copied into row
    dest[j], at slots [0, S'); the rest of that row becomes empty. dest[j] >= B drops row j
    (padding rows of a fixed-size group)."""
    S_new = rows.valid.shape[1]

    def put(buf, new):
        return buf.at[:, dest, :, :S_new].set(new.astype(buf.dtype), mode="drop")

    valid = jnp.zeros((rows.valid.shape[0], cache.valid.shape[1]), bool).at[:, :S_new].set(rows.valid)
    return KVCache(put(cache.k, rows.k), put(cache.v, rows.v),
                   cache.valid.at[dest].set(valid, mode="drop"),
                   cache.index.at[dest].set(rows.index, mode="drop"))
