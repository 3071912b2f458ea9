"""The shared loss core: per-row sums of an objective's per-token terms, and the reduction of
those sums to (loss, metrics). Both the unchunked reference (`reference`) and the chunked fused
path (`chunked`) go through these two functions, so they agree by construction.

Conventions shared by every loss function of the package:
* A paired batch has ``2B`` rows: rows ``[0:B]`` are teacher-generated outputs (TGO, ``chosen``),
  rows ``[B:2B]`` the student-generated outputs (SGO, ``rejected``) of the same prompts.
* ``labels`` is ``[2B, T]`` int with ``-100`` on prompt and padding. Hugging Face causal convention:
  the logits (or hidden state) at position ``t`` predict ``labels[:, t + 1]``; the functions shift.
* Teacher is always stop-gradient; the skew ``alpha`` is always stop-gradient.
* Per-sequence reduction (default): per-token divergence summed over the vocabulary, averaged over
  the response tokens of each sequence, then averaged over the sequences that HAVE response tokens
  (a sequence with zero response tokens contributes neither NaN nor weight). ``reduction="token"``
  is the global token mean of each term (TRL / DistiLLM v1 style).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax.objectives import registry
from distillm2_jax.objectives.base import Reduction, Rows
from distillm2_jax.objectives.curriculum import sequence_gaps
from distillm2_jax.objectives.divergences import at_least_f32

IGNORE_INDEX = -100
REDUCTIONS = ("sequence", "token")
NORMALIZATIONS = ("paper", "authors_code")
LABELS_ONLY = None   # `Spec.name` of `label_logprobs`: label log-probs, no objective

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


class Spec(NamedTuple):
    """Static (hashable) configuration of one loss call."""
    name: str | None             # an objective of the registry, or LABELS_ONLY
    num_pairs: int
    skew_stopgrad: bool
    reduction: str
    normalization: str
    beta_static: float | None    # a Python-number beta, else None (beta then travels as an array)
    has_teacher: bool
    options: tuple = ()          # ((key, value), ...): the loss's static keyword arguments


def make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization, has_teacher,
              options: dict | None = None) -> Spec:
    """Validate a loss call's static options (clear errors naming the argument).

    options: keyword arguments of the objective's loss (`Objective.options`), e.g.
    {"label_smoothing": 0.1} for dpo; the loss's defaults apply to the ones left out.
    """
    options = dict(options or {})
    if name is not LABELS_ONLY:
        objective = registry.get(name)
        if not has_teacher and objective.needs_teacher:
            raise ValueError(f"objective {name!r} needs the teacher; teacher inputs may be None only for "
                             f"{[n for n in registry.NAMES if not registry.get(n).needs_teacher]}")
        unknown = sorted(set(options) - set(objective.options))
        if unknown:
            raise ValueError(f"options: objective {name!r} takes {list(objective.options) or 'none'}, "
                             f"got {unknown[0]!r}")
    elif options:
        raise ValueError(f"options: label log-probs take none, got {sorted(options)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: choose one of {NORMALIZATIONS}")
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs!r}: must be a positive Python int (static)")
    beta_static = float(beta) if isinstance(beta, (int, float)) else None
    return Spec(name, num_pairs, bool(skew_stopgrad), reduction, normalization, beta_static,
                has_teacher, tuple(sorted(options.items())))


def resolve_beta(name: str, beta):
    """`beta`, or the objective's default when None."""
    return registry.get(name).default_beta if beta is None else beta


def alpha_rows(alpha, rows: int) -> jax.Array:
    """A scalar or per-row skew -> [rows] float32, stop-gradient."""
    a = at_least_f32(alpha)
    if a.ndim == 0:
        a = jnp.full((rows,), a)
    elif a.shape != (rows,):
        raise ValueError(f"alpha: expected a scalar or shape [{rows}] (one per row), got {a.shape}")
    return _sg(a)


def term_keys(spec: Spec) -> tuple[str, ...]:
    """Keys of the per-row sums (each [2B])."""
    keys = ("lq_label",) + (("lp_label",) if spec.has_teacher else ())
    if spec.name is not LABELS_ONLY and registry.get(spec.name).divergence is not None:
        keys += ("div",)
    return keys


def zeros_sums(spec: Spec) -> dict[str, jax.Array]:
    return {k: jnp.zeros((2 * spec.num_pairs,), _f32) for k in term_keys(spec)}


def row_terms(spec: Spec, lq, lp, labels, alpha, beta, vocab_offset=0) -> dict[str, jax.Array]:
    """Masked per-row sums over positions of every per-token term the objective needs.

    lq, lp: [N, C, Vt] float32 log-probs (lp None when there is no teacher) of vocab entries
    ``vocab_offset .. vocab_offset + Vt`` (the whole vocab, or one tile of it: every term is a
    sum over the vocab, so tiles add up); labels: [N, C] (already shifted; -100 = not a
    response token); alpha: [N]. Returns {key: [N]}: "lq_label"/"lp_label" (label log-probs)
    and "div", the objective's divergence summed over the rows it trains on (0 on the others).
    """
    n, b = lq.shape[0], spec.num_pairs
    mask = labels != IGNORE_INDEX
    local = labels - vocab_offset
    in_tile = mask & (local >= 0) & (local < lq.shape[-1])
    idx = jnp.clip(local, 0, lq.shape[-1] - 1)[..., None]

    def rsum(x, m):
        return jnp.sum(jnp.where(m, x, 0.0), axis=-1)

    def label(lx):
        return rsum(jnp.take_along_axis(lx, idx, axis=-1)[..., 0], in_tile)

    out = {"lq_label": label(lq)}
    if lp is not None:
        lp = _sg(lp)
        out["lp_label"] = label(lp)
    objective = None if spec.name is LABELS_ONLY else registry.get(spec.name)
    if objective is not None and objective.divergence is not None:
        # Rows are told apart by a mask, not by slicing [0:B] / [B:2B]: under a batch-sharded jit
        # a slice of the row axis moves [rows, C, V] data between devices, a select does not.
        tgo = (jnp.arange(n) < b)[:, None]  # [N, 1]
        beta = spec.beta_static if spec.beta_static is not None else beta
        div = objective.divergence(lp, lq, Rows(tgo, alpha[:, None], beta, spec.skew_stopgrad))
        trained = {"all": mask, "tgo": mask & tgo, "sgo": mask & ~tgo}[objective.trained]
        out["div"] = rsum(div, trained)
    return out


def loss_denominators(labels: jax.Array, num_pairs: int, reduction: str = "sequence") -> dict:
    """The counts a loss divides by, over every leading axis of labels [..., 2B, T] (unshifted).

    {"tgo", "sgo", "all"}: response tokens (reduction "token") or sequences with at least one
    response token ("sequence") of rows [0:B], [B:2B] and both; "pairs": pairs whose two
    responses are both non-empty (dpkd). Pass them as ``denominators`` to every micro-batch of
    an accumulated step and sum the losses: the result is the loss of the whole batch, not a
    mean of per-micro-batch means that weights a short micro-batch's tokens more.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose 'sequence' or 'token'")
    lab = shifted_labels(labels.reshape(-1, labels.shape[-1]))
    tok = jnp.sum(lab != IGNORE_INDEX, axis=-1).reshape(*labels.shape[:-2], 2, num_pairs)
    per_row = tok.astype(_f32) if reduction == "token" else (tok > 0).astype(_f32)
    tgo, sgo = jnp.sum(per_row[..., 0, :]), jnp.sum(per_row[..., 1, :])
    pairs = jnp.sum(((tok[..., 0, :] > 0) & (tok[..., 1, :] > 0)).astype(_f32))
    return {"tgo": tgo, "sgo": sgo, "all": tgo + sgo, "pairs": pairs}


def finalize(spec: Spec, sums: dict, tokens: jax.Array, beta,
             denominators: dict | None = None) -> tuple[jax.Array, dict]:
    """Per-row sums {key: [N]} + token counts [N] -> (scalar loss, metrics).

    denominators: batch-wide counts from `loss_denominators` (else this batch's own counts).
    """
    b = spec.num_pairs
    beta = spec.beta_static if spec.beta_static is not None else beta
    r = Reduction(tokens, b, spec.reduction, denominators)
    t, s, both = r.slices["tgo"], r.slices["sgo"], r.slices["all"]

    def seq_mean(x, rows):  # mean of a per-sequence quantity over valid sequences
        v = r.valid[rows]
        return jnp.sum(jnp.where(v, x[rows], 0.0)) / jnp.maximum(jnp.sum(v), 1)

    lq_seq = _sg(sums["lq_label"]) / r.denom
    m: dict[str, Any] = {
        "student_logp_seq": lq_seq,
        "student_logp": seq_mean(lq_seq, both),
        "student_logp_tgo": seq_mean(lq_seq, t),
        "student_logp_sgo": seq_mean(lq_seq, s),
        "tokens_seq": tokens,
        "num_tokens": jnp.sum(tokens),
    }
    if "lp_label" in sums:
        lp_seq = _sg(sums["lp_label"]) / r.denom
        gap = sequence_gaps(lq_seq, lp_seq, b)
        m.update({
            "teacher_logp_seq": lp_seq,
            "teacher_logp": seq_mean(lp_seq, both),
            "teacher_logp_tgo": seq_mean(lp_seq, t),
            "teacher_logp_sgo": seq_mean(lp_seq, s),
            "gap": gap, "gap_t": gap[t], "gap_s": gap[s],
        })
    loss, parts = registry.get(spec.name).loss(r, sums, beta, spec.normalization, **dict(spec.options))
    m.update({k: _sg(v) for k, v in parts.items()})
    m["loss"] = _sg(loss)
    return loss, m


def shifted_labels(labels: jax.Array) -> jax.Array:
    """[N, T] -> [N, T]: position t holds the label that position t predicts (labels[t + 1]);
    the last position gets -100."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def check_vocab(teacher_width: int, student_width: int, teacher: str, student: str) -> None:
    """Teacher and student must score the same vocabulary (a clear error otherwise)."""
    if teacher_width != student_width:
        raise ValueError(f"{teacher} vocab width {teacher_width} != {student} width {student_width}: "
                         f"slice both to the shared tokenizer vocabulary before calling")


def check_labels(labels, rows, length, num_pairs, what):
    """Labels must be [rows, length] with rows == 2 * num_pairs (a clear error otherwise)."""
    if labels.ndim != 2 or labels.shape != (rows, length):
        raise ValueError(f"labels: expected shape [{rows}, {length}] to match {what}, "
                         f"got {labels.shape}")
    if rows != 2 * num_pairs:
        raise ValueError(f"num_pairs={num_pairs}: {what} has {rows} rows, expected 2*num_pairs")
