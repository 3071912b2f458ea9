"""Logit filters and the per-row sampling draw: pure functions of float32 logits [..., V].

Order (the order Hugging Face `generate` applies its warpers in): temperature, then top-k,
then top-p on the top-k distribution renormalised. A removed token gets logit -inf, so a
softmax of the result is the renormalised distribution that is sampled from.

Ties (documented choice; both filters depend on the logit VALUES only, never on token order):
- top-k keeps every token whose logit is >= the k-th largest logit, so tokens tied with the
  k-th one are all kept (as HF's TopKLogitsWarper does; it may keep more than k tokens).
- top-p keeps the smallest set of highest-probability tokens whose mass is >= p, plus every
  token tied with the least likely member of that set. A token is kept iff the mass of the
  tokens strictly more likely than it is < p, plus ties (HF uses the same rule but breaks ties
  at the boundary by its sort order). At least one token is always kept.

Nothing here sorts the vocabulary (XLA's CPU sort of 16 x 32k logits takes ~100 ms): top-p
finds its threshold among the 64 most likely tokens (`lax.top_k`) when they hold mass >= p,
else by an exact bisection over the float32 bit patterns of the logits (32 masked sums).
Sampling draws one uniform per row and inverts the CDF blockwise (no Gumbel noise per logit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
TOP_P_CANDIDATES = 64   # fast path of top_p_filter: the nucleus usually lies within these
CDF_BLOCK = 256         # block size of the two-level inverse-CDF draw


def _concrete(x) -> bool:
    return isinstance(x, (int, float))


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """logits / temperature (temperature > 0; use argmax for greedy decoding). May be traced."""
    if _concrete(temperature) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep tokens whose logit is >= the k-th largest (ties kept); k <= 0 or k >= V: no-op."""
    logits = logits.astype(jnp.float32)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis as a triangular matmul in full float32.

    (XLA's CPU cumsum is slow to compile; the axes here are short: <= a few hundred.)
    """
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.matmul(x, upper, precision=jax.lax.Precision.HIGHEST)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 values (-inf < ... < -0 <= +0 < ... < inf)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _threshold_by_bisection(logits: jax.Array, probs: jax.Array, p) -> jax.Array:
    """The nucleus threshold as ordered bits [..., 1]: the largest key t with mass(>= t) >= p.

    32 bisection steps over the uint32 keys (exact: the keys of finite floats span < 2**32),
    each one masked sum over the vocabulary. (Stopping early once few tokens are left around
    the threshold needs extra counting reductions per step, which cost more on XLA:CPU than
    the steps they save.)
    """
    keys = _ordered_bits(logits)
    kept = probs > 0
    lo = jnp.min(jnp.where(kept, keys, jnp.uint32(0xFFFFFFFF)), axis=-1)  # mass(>= lo) = 1 >= p
    hi = jnp.max(jnp.where(kept, keys, jnp.uint32(0)), axis=-1)

    def body(_, carry):
        lo, hi = carry  # invariant: mass(>= lo) >= p; the answer is in [lo, hi]
        mid = lo + (hi - lo + 1) // 2
        mass = jnp.sum(jnp.where(keys >= mid[..., None], probs, 0.0), axis=-1)
        ok = mass >= p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo[..., None]


def top_p_filter(logits: jax.Array, p) -> jax.Array:
    """Nucleus filter: keep the smallest most-likely set with mass >= p (ties kept); p >= 1: no-op.

    The mass is measured on softmax(logits), i.e. after any earlier filter, renormalised. p may
    be a traced scalar (then the filter always runs; p >= 1 keeps every token with mass > 0).
    """
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    if _concrete(p) and p >= 1.0:
        return logits
    if _concrete(p) and p <= 0.0:  # keep only the most likely token (and its ties)
        return jnp.where(logits >= jnp.max(logits, axis=-1, keepdims=True), logits, NEG_INF)
    p = jnp.asarray(p, jnp.float32)
    n = min(TOP_P_CANDIDATES, V)
    top_vals, _ = jax.lax.top_k(logits, n)                          # descending
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    top_probs = jnp.exp(top_vals - lse)
    exclusive = _cumsum(top_probs)
    exclusive = jnp.concatenate([jnp.zeros_like(exclusive[..., :1]), exclusive[..., :-1]], axis=-1)
    count = jnp.sum(exclusive < p, axis=-1, keepdims=True)          # >= 1 (exclusive[0] = 0)
    fast_thresh = jnp.take_along_axis(top_vals, count - 1, axis=-1)  # value of the last kept
    # The nucleus lies within the candidates iff they hold mass >= p (always when n == V).
    in_candidates = (jnp.sum(top_probs, axis=-1) >= p) | (n == V)
    fast_keep = logits >= fast_thresh

    def slow(_):
        probs = jax.nn.softmax(logits, axis=-1)
        return _ordered_bits(logits) >= _threshold_by_bisection(logits, probs, p)

    keep = jax.lax.cond(jnp.all(in_candidates), lambda _: fast_keep, slow, None)
    return jnp.where(keep, logits, NEG_INF)


def filter_logits(logits: jax.Array, *, temperature=1.0, top_k: int = 0, top_p=1.0) -> jax.Array:
    """temperature -> top-k -> top-p; softmax of the result is the sampling distribution.

    top_k must be a Python int (static); temperature and top_p may be traced scalars.
    """
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


def categorical(u: jax.Array, logits: jax.Array) -> jax.Array:
    """Draw token ids from softmax(logits) [..., V] given one uniform u in [0, 1) per row.

    Inverse CDF in two levels (block sums of CDF_BLOCK tokens, then within the chosen block),
    so the float32 running sums stay short and accurate. Tokens with logit -inf are never drawn.
    """
    logits = logits.astype(jnp.float32)
    *batch, V = logits.shape
    size = min(CDF_BLOCK, V)
    nb = -(-V // size)
    w = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))     # in [0, 1], max = 1
    w = jnp.pad(w, [(0, 0)] * len(batch) + [(0, nb * size - V)])
    wb = w.reshape(*batch, nb, size)
    block_mass = jnp.sum(wb, axis=-1)                                 # [..., nb]
    cum = _cumsum(block_mass)
    target = u.astype(jnp.float32) * cum[..., -1]
    last_block = _last_positive(block_mass)
    blk = jnp.minimum(jnp.sum(cum <= target[..., None], axis=-1), last_block)
    before = jnp.take_along_axis(cum - block_mass, blk[..., None], axis=-1)[..., 0]
    inner = jnp.take_along_axis(wb, blk[..., None, None], axis=-2)[..., 0, :]   # [..., CDF_BLOCK]
    rest = jnp.maximum(target - before, 0.0)
    inner_cum = _cumsum(inner)
    j = jnp.minimum(jnp.sum(inner_cum <= rest[..., None], axis=-1), _last_positive(inner))
    return (blk * size + j).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    """Index of the last entry > 0 along the last axis (0 if none)."""
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(x > 0, idx, 0), axis=-1)
