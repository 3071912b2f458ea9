"""`label_logprobs`: label log-probabilities alone, chunked, against a numpy re-derivation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import objectives


def _numpy_label_logprobs(hidden, head, labels, softcap=None):
    z = np.einsum("nth,hv->ntv", hidden.astype(np.float64), head.astype(np.float64))
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    sums, counts = np.zeros(len(labels)), np.zeros(len(labels), int)
    for r in range(len(labels)):
        for t in range(labels.shape[1] - 1):
            y = labels[r, t + 1]
            if y != -100:
                sums[r] += logp[r, t, y]
                counts[r] += 1
    return sums, counts


def _batch(n, t=11, h=6, v=13, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, t, h)).astype(np.float32)
    head = rng.normal(size=(h, v)).astype(np.float32)
    labels = rng.integers(0, v, size=(n, t))
    labels[:, :3] = -100                  # prompt
    labels[0, 7:] = -100                  # right padding
    labels[-1] = -100                     # a row with nothing to score
    return hidden, head, labels


@pytest.mark.parametrize("n, chunk, softcap", [(4, 3, None), (3, 4, None), (5, 128, 2.5)])
def test_matches_numpy(n, chunk, softcap):
    hidden, head, labels = _batch(n)
    got, tokens = objectives.label_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels),
                                            chunk_size=chunk, softcap=softcap)
    want, counts = _numpy_label_logprobs(hidden, head, labels, softcap)
    assert got.shape == (n,) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, counts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(got[-1]) == 0.0 and int(tokens[-1]) == 0


def test_reference_from_logits_agrees():
    hidden, head, labels = _batch(4)
    got, tokens = objectives.label_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels),
                                            chunk_size=4)
    ref, ref_tokens = objectives.label_logprobs_from_logits(jnp.asarray(hidden @ head), jnp.asarray(labels))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_gradient_matches_finite_differences():
    """Differentiable w.r.t. the head (logits are float32 inside, so a float32-sized step)."""
    hidden, head, labels = _batch(2, t=7, h=4, v=5)
    f = lambda w: jnp.sum(objectives.label_logprobs(jnp.asarray(hidden), w, jnp.asarray(labels),  # noqa: E731
                                                    chunk_size=3)[0])
    w = jnp.asarray(head)
    g = np.asarray(jax.grad(f)(w))
    eps = 1e-2
    for idx in [(0, 0), (1, 3), (3, 4)]:
        d = np.zeros(head.shape, np.float32)
        d[idx] = eps
        fd = (float(f(w + d)) - float(f(w - d))) / (2 * eps)
        assert abs(fd - g[idx]) < 2e-3 * max(1.0, abs(fd)), (idx, fd, g[idx])


def test_bad_shapes_are_named():
    hidden, head, labels = _batch(2)
    with pytest.raises(ValueError, match="labels: expected shape"):
        objectives.label_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels[:, :-1]))
    with pytest.raises(ValueError, match="head"):
        objectives.label_logprobs(jnp.asarray(hidden), jnp.asarray(head.T), jnp.asarray(labels))
