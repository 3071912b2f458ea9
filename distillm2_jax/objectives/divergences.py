"""Per-token divergences between a teacher p and a student q, as pure functions of log-probs.

lp: teacher log-probs, lq: student log-probs, both [..., V] in float32 (``log_softmax``). The
teacher is always stop-gradient. ``alpha`` / ``beta`` broadcast against [...] (the shape without
the vocab axis). Every function returns [...]: a sum over the vocabulary, so vocab tiles add up
(the chunked loss relies on that). Mixtures are taken in log space:
``log(a p + (1-a) q) = logaddexp(log a + log p, log(1-a) + log q)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


def at_least_f32(x) -> jax.Array:
    """x in float32, or in its own dtype when that is wider (float64 under x64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, _f32))


def log_softmax(logits: jax.Array) -> jax.Array:
    """Log-softmax in (at least) float32 over the last (vocab) axis: [..., V] -> [..., V]."""
    return jax.nn.log_softmax(at_least_f32(logits), axis=-1)


def coef(x) -> jax.Array:
    """A stop-gradient mixture weight broadcast over the vocab axis: [...] -> [..., 1]."""
    return _sg(at_least_f32(x))[..., None]


def forward_kl(lp: jax.Array, lq: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p (log p - log q): [..., V] x2 -> [...]."""
    lp = _sg(lp)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def reverse_kl(lp: jax.Array, lq: jax.Array) -> jax.Array:
    """KL(q || p) = sum_v q (log q - log p): [..., V] x2 -> [...]."""
    lp = _sg(lp)
    return jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1)


def skew_kl(lp: jax.Array, lq: jax.Array, alpha) -> jax.Array:
    """SKL_a(p || q) = KL(p || a p + (1-a) q): pulls the student up on teacher text. -> [...]."""
    lp, a = _sg(lp), coef(alpha)
    lm = jnp.logaddexp(jnp.log(a) + lp, jnp.log1p(-a) + lq)
    return jnp.sum(jnp.exp(lp) * (lp - lm), axis=-1)


def skew_reverse_kl(lp: jax.Array, lq: jax.Array, alpha, stopgrad: bool = True) -> jax.Array:
    """SRKL_a(p || q) = KL(q || (1-a) p + a q): pushes the student down on its own text. -> [...].

    ``stopgrad=True`` uses ``a * sg(q)`` inside the mixture (the authors' code).
    """
    lp, a = _sg(lp), coef(alpha)
    lq_mix = _sg(lq) if stopgrad else lq
    lm = jnp.logaddexp(jnp.log1p(-a) + lp, jnp.log(a) + lq_mix)
    return jnp.sum(jnp.exp(lq) * (lq - lm), axis=-1)


def skew_kl_or_reverse(lp: jax.Array, lq: jax.Array, alpha, teacher_rows: jax.Array,
                       stopgrad: bool = True) -> jax.Array:
    """SKL_a where ``teacher_rows`` [..., 1] is True, SRKL_a elsewhere, as one expression.

    CALD's two halves: x = the KL's first argument (p on teacher rows, q on student rows), y the
    other distribution; KL(x || a x + (1-a) y). One expression instead of two selects of whole
    results, so each vocab entry is computed once.
    """
    t3, a3 = teacher_rows[..., None], coef(alpha)
    lp = _sg(lp)
    lx = jnp.where(t3, lp, lq)
    lx_mix = jnp.where(t3, lp, _sg(lq) if stopgrad else lq)
    ly = jnp.where(t3, lq, lp)
    lm = jnp.logaddexp(jnp.log(a3) + lx_mix, jnp.log1p(-a3) + ly)
    return jnp.sum(jnp.exp(lx) * (lx - lm), axis=-1)


def generalized_jsd(lp: jax.Array, lq: jax.Array, beta) -> jax.Array:
    """TRL's generalized JSD: m = b p + (1-b) q, b KL(p||m) + (1-b) KL(q||m). -> [...].

    End points are special-cased (TRL convention): b = 0 -> KL(p||q), b = 1 -> KL(q||p).
    A Python-number ``beta`` selects the branch at trace time; a traced one uses ``jnp.where``.
    """
    if isinstance(beta, (int, float)):
        if beta == 0:
            return forward_kl(lp, lq)
        if beta == 1:
            return reverse_kl(lp, lq)
    lp, b = _sg(lp), coef(beta)
    lm = jnp.logaddexp(jnp.log(b) + lp, jnp.log1p(-b) + lq)
    jsd = (b[..., 0] * jnp.sum(jnp.exp(lp) * (lp - lm), axis=-1)
           + (1 - b[..., 0]) * jnp.sum(jnp.exp(lq) * (lq - lm), axis=-1))
    if isinstance(beta, (int, float)):
        return jsd
    b0 = b[..., 0]
    return jnp.where(b0 == 0, forward_kl(lp, lq), jnp.where(b0 == 1, reverse_kl(lp, lq), jsd))


def total_variation(lp: jax.Array, lq: jax.Array) -> jax.Array:
    """TV(p, q) = 0.5 sum_v |p - q|: [..., V] x2 -> [...]."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(_sg(lp)) - jnp.exp(lq)), axis=-1)
