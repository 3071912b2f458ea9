"""The unchunked objective on full [2B, T, V] logits: the reference the chunked fused path is
tested against, and the simple path for small vocabularies and scripts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distillm2_jax.objectives import terms
from distillm2_jax.objectives.divergences import log_softmax

_sg = jax.lax.stop_gradient


def objective(name: str, student_logits: jax.Array, teacher_logits: jax.Array | None,
              labels: jax.Array, *, num_pairs: int, alpha=0.1, beta=None,
              skew_stopgrad: bool = True, reduction: str = "sequence",
              normalization: str = "paper", denominators: dict | None = None,
              options: dict | None = None) -> tuple[jax.Array, dict]:
    """One objective on a paired batch of full logits (conventions: `objectives.terms`).

    Args:
      name: one of ``objectives.NAMES``.
      student_logits, teacher_logits: [2B, T, V] (any float dtype; float32 inside). The caller
        slices both to the shared vocabulary. ``teacher_logits`` may be None for seqkd / sft.
      labels: [2B, T] int, -100 on prompt and padding (HF causal convention; shifted here).
      num_pairs: B (static). alpha: scalar or [2B] skew (stop-gradient). beta: CALD b (default
        0.5), GKD JSD weight (0.9), DPKD / DPO / IPO temperature (0.1); ignored by the others.
      skew_stopgrad: student inside the SRKL mixture is stop-gradient (authors' code).
      reduction: "sequence" (mean over sequences of per-sequence token means) or "token".
      normalization: "paper" ((1-b) SKL + b SRKL) or "authors_code" ((2-2b) SKL + 2b SRKL).
      denominators: batch-wide counts (``loss_denominators``) when this batch is one
        micro-batch of several; the micro-batch losses then add up to the whole batch's loss.
      options: the objective's static loss options (``Objective.options``), e.g.
        {"label_smoothing": 0.1} for dpo.

    Returns:
      (loss scalar, metrics dict); see docs/losses.md for the metric keys.
    """
    beta = terms.resolve_beta(name, beta)
    if student_logits.ndim != 3:
        raise ValueError(f"student_logits: expected [2B, T, V], got shape {student_logits.shape}")
    n, t, v = student_logits.shape
    if teacher_logits is not None:
        if teacher_logits.ndim != 3 or teacher_logits.shape[:2] != (n, t):
            raise ValueError(f"teacher_logits: expected shape [{n}, {t}, V], "
                             f"got {teacher_logits.shape}")
        terms.check_vocab(teacher_logits.shape[2], v, "teacher_logits", "student_logits")
    spec = terms.make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization,
                           teacher_logits is not None, options)
    terms.check_labels(labels, n, t, num_pairs, "student_logits")
    alpha = terms.alpha_rows(alpha, n)
    lab = labels[:, 1:]
    lq = log_softmax(student_logits[:, :-1])
    lp = None if teacher_logits is None else _sg(log_softmax(teacher_logits[:, :-1]))
    sums = terms.row_terms(spec, lq, lp, lab, alpha, beta)
    return terms.finalize(spec, sums, jnp.sum(lab != terms.IGNORE_INDEX, axis=1), beta, denominators)


def label_logprobs_from_logits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row sums of the labels' log-probs and their counts from full logits [N, T, V] and
    labels [N, T] (unshifted): the reference for `chunked.label_logprobs`."""
    lab = labels[:, 1:]
    lq = log_softmax(logits[:, :-1])
    mask = lab != terms.IGNORE_INDEX
    picked = jnp.take_along_axis(lq, jnp.where(mask, lab, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1), jnp.sum(mask, axis=-1)


def sequence_logprobs(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array) -> dict[str, jax.Array]:
    """Per-sequence mean label log-probs from full logits (stop-gradient): the reference for
    `chunked.chunked_sequence_logprobs`. [N, T, V] x2, [N, T] ->
    {"student_logp_seq": [N], "teacher_logp_seq": [N], "tokens_seq": [N]}."""
    lq, tokens = label_logprobs_from_logits(_sg(student_logits), labels)
    lp, _ = label_logprobs_from_logits(_sg(teacher_logits), labels)
    denom = jnp.maximum(tokens.astype(jnp.float32), 1.0)
    return {"student_logp_seq": lq / denom, "teacher_logp_seq": lp / denom, "tokens_seq": tokens}
