"""Rotary position embeddings: inverse frequencies (default, linear, llama3, yarn), per-layer
tables and application.

Frequencies are computed in float32 numpy as transformers' `modeling_rope_utils` does, so
logits match HF. A model has one or a few distinct ropes (`ModelConfig.rope_specs`: Gemma 3's
local and global bases, OLMo 3's yarn on full-attention layers only, SmolLM3's NoPE layers);
`tables` computes each once per forward and a layer picks its own by the index
`ModelConfig.layer_rope_index` scanned alongside its weights.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distillm2_jax.models.config import ModelConfig, RopeSpec


def _yarn(spec: RopeSpec, dim: int) -> np.ndarray:
    """transformers' `_compute_yarn_parameters`: interpolate the low frequencies by `factor`,
    keep the high ones, with a linear ramp between the beta_fast / beta_slow rotation bounds."""
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(spec.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(spec.theta))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1.0) - ramp).astype(np.float32)
    pos_freqs = np.float32(spec.theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(spec.factor) * pos_freqs)
    return (inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation).astype(np.float32)


def inv_frequencies(spec: RopeSpec, dim: int) -> np.ndarray:
    """[dim // 2] float32 inverse frequencies of one rope after its scaling."""
    if spec.rope_type == "yarn":
        return _yarn(spec, dim)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(spec.theta) ** exponents)).astype(np.float32)
    if spec.rope_type == "linear":
        inv_freq = inv_freq / np.float32(spec.factor)
    elif spec.rope_type == "llama3":
        factor = spec.factor
        low, high = spec.low_freq_factor, spec.high_freq_factor
        old_len = spec.original_max_position
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def cos_sin_of(spec: RopeSpec, dim: int, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, dim] (float32) of one rope at integer positions [B, T]; NoPE: 1 and 0."""
    if spec.rope_type == "none":
        shape = positions.shape + (dim,)
        return jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
    inv_freq = jnp.asarray(inv_frequencies(spec, dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if spec.attention_factor != 1.0:  # yarn's mscale, applied to cos and sin as transformers does
        cos, sin = cos * spec.attention_factor, sin * spec.attention_factor
    return cos, sin


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, head_dim] (float32) of a model with one rope for every layer."""
    (spec,) = cfg.rope_specs
    return cos_sin_of(spec, cfg.head_dim, positions)


def tables(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of every distinct rope at positions [B, T]: [B, T, D] when the model has one,
    else stacked [K, B, T, D] (a layer takes its own with `pick`)."""
    specs = cfg.rope_specs
    if len(specs) == 1:
        return cos_sin(cfg, positions)
    pairs = [cos_sin_of(spec, cfg.head_dim, positions) for spec in specs]
    return jnp.stack([c for c, _ in pairs]), jnp.stack([s for _, s in pairs])


def pick(table: tuple[jnp.ndarray, jnp.ndarray], index: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One layer's cos, sin [B, T, D] from `tables` and its rope index (a scanned scalar)."""
    cos, sin = table
    if cos.ndim == 3:
        return cos, sin
    return cos[index], sin[index]


def layer_indices(cfg: ModelConfig) -> jnp.ndarray:
    """[L] int32: each layer's index into `cfg.rope_specs` (scanned alongside the weights)."""
    return jnp.asarray(cfg.layer_rope_index, jnp.int32)


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, head_dim] (rotate-half convention, as HF)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
