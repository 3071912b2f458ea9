"""Logit filters (exact, against a NumPy reference) and the sampler's draw (statistical).

The statistical tests draw many tokens through the sampler's own step function
(`sampling.next_token`, one row per draw, each row with its own key as in generation) from a
fixed logits vector and compare the counts with the filtered, renormalised distribution by a
chi-square test. A test fails when its p-value is below 1e-3, so with a random seed each would
raise a false alarm with probability 1e-3; the seeds are fixed, so the outcome is deterministic.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from distillm2_jax.sampling import (
    SamplingConfig,
    categorical,
    filter_logits,
    next_token,
    row_keys_from_ids,
    sample_logits,
    top_k_filter,
)

P_VALUE = 1e-3


def reference_filter(logits, temperature=1.0, k=0, p=1.0):
    """NumPy float64 reference: temperature, top-k (ties kept), top-p (smallest prefix with
    mass >= p, ties kept). Also returns how close the nucleus decision came to p."""
    x = np.asarray(logits, np.float64) / temperature
    V = x.shape[-1]
    if 0 < k < V:
        kth = np.sort(x)[::-1][k - 1]
        x = np.where(x >= kth, x, -np.inf)
    margin = np.inf
    if p < 1.0:
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-x, kind="stable")
        exclusive = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        count = int(np.sum(exclusive < p))
        thresh = x[order][count - 1]
        x = np.where(x >= thresh, x, -np.inf)
        finite = probs[order] > 0
        margin = np.min(np.abs(exclusive[finite] - p))
    return x, margin


def kept(x):
    return set(np.flatnonzero(np.isfinite(np.asarray(x))).tolist())


# ----------------------------------------------------------------------------- exact filters

def test_top_k_keeps_k_and_ties():
    x = jnp.array([[0.5, 3.0, -1.0, 2.0, 1.0]])
    assert kept(top_k_filter(x, 2)[0]) == {1, 3}
    assert kept(top_k_filter(x, 1)[0]) == {1}
    assert kept(top_k_filter(x, 0)[0]) == set(range(5))        # 0 = off
    assert kept(top_k_filter(x, 9)[0]) == set(range(5))        # k >= V = off
    ties = jnp.array([[3.0, 2.0, 2.0, 1.0]])
    assert kept(top_k_filter(ties, 2)[0]) == {0, 1, 2}           # tied with the k-th: kept
    np.testing.assert_array_equal(top_k_filter(x, 2)[0][np.array([1, 3])], [3.0, 2.0])  # values untouched


@functools.lru_cache(maxsize=None)
def _filter(k):
    """filter_logits jitted once per top_k (temperature and top_p traced: fewer compiles)."""
    return jax.jit(lambda x, t, p: filter_logits(x, temperature=t, top_k=k, top_p=p))


def top_p(x, p, k=0):
    return np.asarray(_filter(k)(jnp.asarray(x, jnp.float32)[None], 1.0, p))[0]


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = np.log([0.15, 0.5, 0.05, 0.3])
    assert kept(top_p(x, 0.45)) == {1}                 # 0.5 >= 0.45
    assert kept(top_p(x, 0.75)) == {1, 3}              # 0.5 < 0.75 <= 0.8
    assert kept(top_p(x, 0.85)) == {0, 1, 3}           # 0.8 < 0.85 <= 0.95
    assert kept(top_p(x, 0.97)) == {0, 1, 2, 3}
    assert kept(top_p(x, 1.0)) == {0, 1, 2, 3}
    assert kept(top_p(np.log([0.4, 0.2, 0.2, 0.2]), 0.5)) == {0, 1, 2, 3}   # the boundary token's ties too
    # the mass is measured after top-k, renormalised: top-2 -> {0.5, 0.3} / 0.8
    assert kept(top_p(x, 0.6, k=2)) == {1}             # 0.625 >= 0.6
    assert kept(top_p(x, 0.7, k=2)) == {1, 3}
    # concrete p >= 1 is the identity
    from distillm2_jax.sampling import top_p_filter
    assert kept(top_p_filter(jnp.asarray(x), 1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature,k,p", [(1.0, 0, 0.9), (1.3, 0, 0.3), (0.7, 4, 0.95), (1.0, 4, 1.0)])
def test_filters_match_numpy_reference(temperature, k, p):
    """Peaked rows (nucleus among the 64 top candidates) and flat rows (exact bisection path)."""
    rng = np.random.default_rng(0)
    V = 300
    peaked = rng.normal(size=(24, V)) * 6.0
    flat = rng.normal(size=(24, V)) * 0.4
    ties = np.round(rng.normal(size=(24, V)) * 2.0) / 2.0     # many exactly tied logits
    ties[0] = np.repeat([2.0, 1.0, 0.0], [10, 200, 90])       # > 64 tokens tied at the boundary
    ties[1] = rng.permutation(ties[0])
    checked = 0
    for batch in (peaked, flat, ties):
        got = np.asarray(_filter(k)(jnp.asarray(batch, jnp.float32), temperature, p))
        for row, out in zip(batch.astype(np.float32), got):
            ref, margin = reference_filter(row, temperature, k, p)
            if margin < 1e-5:   # float32 vs float64 mass too close to p to call
                continue
            assert kept(out) == kept(ref)
            np.testing.assert_allclose(out[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
            checked += 1
    assert checked > 50
    if p == 0.9:  # the flat rows really needed more than the 64 candidates
        assert max(len(kept(reference_filter(r, temperature, k, p)[0])) for r in flat) > 64


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    keys = row_keys_from_ids(jax.random.key(0), jnp.arange(2, dtype=jnp.uint32))
    got = next_token(logits, keys, jnp.int32(0), SamplingConfig(temperature=0.0))
    assert got.tolist() == [1, 0]


# ----------------------------------------------------------------------------- draws

def _chi_square(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    expected = probs[support].astype(np.float64)
    expected = counts.sum() * expected / expected.sum()
    return stats.chisquare(counts[support], expected).pvalue


DRAWS = 20000


@functools.lru_cache(maxsize=None)
def _draw(k):
    """The sampler's draw (`sample_logits`, what `next_token` runs), jitted once per top_k."""
    return jax.jit(lambda keys, x, step, t, p: sample_logits(x, keys, step, temperature=t, top_k=k, top_p=p))
LOGITS = np.array([1.2, -0.3, 0.8, 2.0, -1.5, 0.1, 0.9, -0.7, 1.7, 0.4], np.float32)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.5, top_k=4),
    SamplingConfig(temperature=1.5, top_p=0.7),
    SamplingConfig(temperature=0.8, top_k=4, top_p=0.6),
    SamplingConfig(temperature=0.8, top_p=0.95),       # the paper's setting
], ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_sampling_frequencies_match_filtered_distribution(sampling):
    """Chi-square (p-value threshold 1e-3, see module doc) over 20000 draws of the sampler's step,
    against the NumPy reference distribution (temperature, top-k, top-p, renormalised)."""
    keys = row_keys_from_ids(jax.random.key(123), jnp.arange(DRAWS, dtype=jnp.uint32))
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, LOGITS.size))
    draw = _draw(sampling.top_k)
    t, p = sampling.temperature, sampling.top_p
    tokens = np.asarray(draw(keys, logits, jnp.int32(3), t, p))
    counts = np.bincount(tokens, minlength=LOGITS.size)
    filtered, margin = reference_filter(LOGITS, t, sampling.top_k, p)
    assert margin > 1e-4
    probs = np.exp(filtered - filtered.max())
    assert _chi_square(counts, probs) > P_VALUE
    # another step draws other tokens from the same row keys (the key is folded per step)
    other = np.asarray(draw(keys, logits, jnp.int32(4), t, p))
    assert (other != tokens).mean() > 0.2


def test_categorical_frequencies_across_cdf_blocks():
    """A distribution over a large vocabulary (several 256-token CDF blocks, most tokens -inf)."""
    V = 1000
    support = np.array([0, 1, 255, 256, 257, 511, 512, 700, 998, 999])
    weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 2.0, 1.5, 0.75, 1.0])
    x = np.full(V, -np.inf, np.float32)
    x[support] = np.log(weights)
    u = jax.random.uniform(jax.random.key(7), (DRAWS,)).at[:2].set(jnp.array([0.0, 0.9999999]))
    tokens = np.asarray(jax.jit(categorical)(u, jnp.broadcast_to(jnp.asarray(x), (DRAWS, V))))
    assert tokens[:2].tolist() == [0, 999]     # u = 0 -> the first token, u -> 1: the last
    probs = np.zeros(V)
    probs[support] = weights / weights.sum()
    assert _chi_square(np.bincount(tokens, minlength=V), probs) > P_VALUE
