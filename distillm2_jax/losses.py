"""The DistiLLM-2 objective (CALD), its baselines, and a chunked loss without [2B, T, V] logits.

Pure functions only; no model code. Conventions shared by every public function:

* A paired batch has ``2B`` rows: rows ``[0:B]`` are teacher-generated outputs (TGO, ``chosen``),
  rows ``[B:2B]`` the student-generated outputs (SGO, ``rejected``) of the same prompts.
* ``labels`` is ``[2B, T]`` int with ``-100`` on prompt and padding. Hugging Face causal convention:
  the logits (or hidden state) at position ``t`` predict ``labels[:, t + 1]``; the functions shift.
* Teacher is always stop-gradient; the skew ``alpha`` is always stop-gradient.
* Log-softmax in float32 over the full vocabulary; mixtures in log space
  (``log(a p + (1-a) q) = logaddexp(log a + log p, log(1-a) + log q)``).
* Per-sequence reduction (default): per-token divergence summed over the vocabulary, averaged over
  the response tokens of each sequence, then averaged over the sequences that HAVE response tokens
  (a sequence with zero response tokens contributes neither NaN nor weight). ``reduction="token"``
  is the global token mean of each term (TRL / DistiLLM v1 style).

See docs/losses.md for every formula as implemented.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax import objectives
from distillm2_jax.curriculum import sequence_gaps

IGNORE_INDEX = -100
OBJECTIVES = objectives.NAMES  # what each one trains on and needs: distillm2_jax.objectives
REDUCTIONS = ("sequence", "token")
NORMALIZATIONS = ("paper", "authors_code")
GRAD_MODES = ("fused", "remat")
# Default ``beta`` per objective: b of CALD, JSD mixture weight of GKD, DPO temperature of DPKD.
DEFAULT_BETA = {"distillm2": 0.5, "gkd": 0.9, "dpkd": 0.1}
# Objectives whose loss is nonlinear in the per-sequence sums (fused path needs a first pass).
_NONLINEAR = ("dpkd",)
# Vocab tiles inside a chunk of the fused path (gradient passes and head-gradient update).
_VOCAB_TILES = 16

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------------------------
# Per-token divergences. lp: teacher log-probs, lq: student log-probs, both [..., V] float32.
# alpha / beta broadcast against [...] (the shape without the vocab axis). Return [...].
# --------------------------------------------------------------------------------------------
def _at_least_f32(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, _f32))


def log_softmax(logits: jax.Array) -> jax.Array:
    """Log-softmax in (at least) float32 over the last (vocab) axis: [..., V] -> [..., V]."""
    return jax.nn.log_softmax(_at_least_f32(logits), axis=-1)


def _coef(x) -> jax.Array:
    return _sg(_at_least_f32(x))[..., None]


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
    lp, a = _sg(lp), _coef(alpha)
    lm = jnp.logaddexp(jnp.log(a) + lp, jnp.log1p(-a) + lq)
    return jnp.sum(jnp.exp(lp) * (lp - lm), axis=-1)


def skew_reverse_kl(lp: jax.Array, lq: jax.Array, alpha, stopgrad: bool = True) -> jax.Array:
    """SRKL_a(p || q) = KL(q || (1-a) p + a q): pushes the student down on its own text. -> [...].

    ``stopgrad=True`` uses ``a * sg(q)`` inside the mixture (the authors' code).
    """
    lp, a = _sg(lp), _coef(alpha)
    lq_mix = _sg(lq) if stopgrad else lq
    lm = jnp.logaddexp(jnp.log1p(-a) + lp, jnp.log(a) + lq_mix)
    return jnp.sum(jnp.exp(lq) * (lq - lm), axis=-1)


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
    lp, b = _sg(lp), _coef(beta)
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


# --------------------------------------------------------------------------------------------
# Shared core: per-row sums of per-token terms (used by both the plain and the chunked paths),
# and the final reduction from those sums. Equality of the two paths follows by construction.
# --------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    """Static (hashable) configuration of an objective."""
    name: str
    num_pairs: int
    skew_stopgrad: bool
    reduction: str
    normalization: str
    beta_static: float | None  # a Python-number beta, else None (beta then travels as an array)
    has_teacher: bool


def _make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization, has_teacher):
    if name not in OBJECTIVES:
        raise ValueError(f"name={name!r}: unknown objective; choose one of {OBJECTIVES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: choose one of {NORMALIZATIONS}")
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs!r}: must be a positive Python int (static)")
    if not has_teacher and objectives.get(name).needs_teacher:
        raise ValueError(f"objective {name!r} needs the teacher; teacher inputs may be None only for "
                         f"{[n for n in OBJECTIVES if not objectives.get(n).needs_teacher]}")
    beta_static = float(beta) if isinstance(beta, (int, float)) else None
    return _Spec(name, num_pairs, bool(skew_stopgrad), reduction, normalization, beta_static,
                 has_teacher)


def _resolve_beta(name, beta):
    if beta is None:
        return DEFAULT_BETA.get(name, 0.0)
    return beta


def _alpha_rows(alpha, rows: int) -> jax.Array:
    a = _at_least_f32(alpha)
    if a.ndim == 0:
        a = jnp.full((rows,), a)
    elif a.shape != (rows,):
        raise ValueError(f"alpha: expected a scalar or shape [{rows}] (one per row), got {a.shape}")
    return _sg(a)


def _term_keys(spec: _Spec) -> tuple[str, ...]:
    """Keys of the per-row sums (each [2B])."""
    keys = ("lq_label",) + (("lp_label",) if spec.has_teacher else ())
    if spec.name in ("distillm2", "distillm", "kd", "rkl", "gkd"):
        keys += ("div",)
    return keys


def _row_terms(spec: _Spec, lq, lp, labels, alpha, beta, vocab_offset=0) -> dict[str, jax.Array]:
    """Masked per-row sums over positions of every per-token term the objective needs.

    lq, lp: [N, C, Vt] float32 log-probs (lp None when there is no teacher) of vocab entries
    ``vocab_offset .. vocab_offset + Vt`` (the whole vocab, or one tile of it: every term is a
    sum over the vocab, so tiles add up); labels: [N, C] (already shifted; -100 = not a
    response token); alpha: [N]. Returns {key: [N]}: "lq_label"/"lp_label" (label log-probs)
    and "div", the objective's divergence: SKL on TGO rows and SRKL on SGO rows (distillm2),
    SRKL (distillm), FKL on TGO rows (kd), RKL on SGO rows (rkl), JSD (gkd); 0 on unused rows.
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
    # Rows are told apart by a mask, not by slicing [0:B] / [B:2B]: under a batch-sharded jit a
    # slice of the row axis moves [rows, C, V] data between devices, a select does not.
    tgo = (jnp.arange(n) < b)[:, None]  # [N, 1]
    a = alpha[:, None]
    beta = spec.beta_static if spec.beta_static is not None else beta
    div = None
    if spec.name == "distillm2":
        # TGO rows: SKL = KL(p || a p + (1-a) q); SGO rows: SRKL = KL(q || a q + (1-a) p).
        # One expression: x = the KL's first argument, y = the other distribution.
        t3, a3 = tgo[..., None], _coef(a)
        lx = jnp.where(t3, lp, lq)
        lx_mix = jnp.where(t3, lp, _sg(lq) if spec.skew_stopgrad else lq)
        ly = jnp.where(t3, lq, lp)
        lm = jnp.logaddexp(jnp.log(a3) + lx_mix, jnp.log1p(-a3) + ly)
        div = jnp.sum(jnp.exp(lx) * (lx - lm), axis=-1)
    elif spec.name == "distillm":
        div = skew_reverse_kl(lp, lq, a, spec.skew_stopgrad)
    elif spec.name == "kd":
        div, mask = forward_kl(lp, lq), mask & tgo
    elif spec.name == "rkl":
        div, mask = reverse_kl(lp, lq), mask & ~tgo
    elif spec.name == "gkd":
        div = generalized_jsd(lp, lq, beta)
    if div is not None:
        out["div"] = rsum(div, mask)
    return out


# Metrics that are sums over rows divided by a batch-wide count: with `denominators` spanning
# several micro-batches they add up across them (every other metric is a per-micro-batch mean).
ADDITIVE_METRICS = frozenset({"loss", "skl", "srkl", "srkl_tgo", "srkl_sgo", "fkl", "rkl", "jsd",
                              "jsd_tgo", "jsd_sgo", "nll", "dpkd_margin", "dpkd_accuracy"})


def loss_denominators(labels: jax.Array, num_pairs: int, reduction: str = "sequence") -> dict:
    """The counts a loss divides by, over every leading axis of labels [..., 2B, T] (unshifted).

    {"tgo", "sgo", "all"}: response tokens (reduction "token") or sequences with at least one
    response token ("sequence") of rows [0:B], [B:2B] and both; "pairs": pairs whose two
    responses are both non-empty (dpkd). Pass them as ``denominators`` to every micro-batch of
    an accumulated step and sum the losses: the result is the loss of the whole batch, not a
    mean of per-micro-batch means that weights a short micro-batch's tokens more.
    """
    if reduction not in ("sequence", "token"):
        raise ValueError(f"reduction={reduction!r}: choose 'sequence' or 'token'")
    lab = _shifted_labels(labels.reshape(-1, labels.shape[-1]))
    tok = jnp.sum(lab != IGNORE_INDEX, axis=-1).reshape(*labels.shape[:-2], 2, num_pairs)
    per_row = tok.astype(_f32) if reduction == "token" else (tok > 0).astype(_f32)
    tgo, sgo = jnp.sum(per_row[..., 0, :]), jnp.sum(per_row[..., 1, :])
    pairs = jnp.sum(((tok[..., 0, :] > 0) & (tok[..., 1, :] > 0)).astype(_f32))
    return {"tgo": tgo, "sgo": sgo, "all": tgo + sgo, "pairs": pairs}


def _finalize(spec: _Spec, sums: dict, tokens: jax.Array, beta,
              denominators: dict | None = None) -> tuple[jax.Array, dict]:
    """Per-row sums {key: [N]} + token counts [N] -> (scalar loss, metrics).

    denominators: batch-wide counts from `loss_denominators` (else this batch's own counts).
    """
    b = spec.num_pairs
    beta = spec.beta_static if spec.beta_static is not None else beta
    tok = tokens.astype(_f32)
    valid = tokens > 0
    denom = jnp.maximum(tok, 1.0)
    t, s, both = slice(0, b), slice(b, 2 * b), slice(0, 2 * b)
    groups = {(0, b): "tgo", (b, 2 * b): "sgo", (0, 2 * b): "all"}

    def count(rows):
        if denominators is not None:
            return jnp.maximum(jnp.asarray(denominators[groups[(rows.start, rows.stop)]], _f32), 1.0)
        if spec.reduction == "token":
            return jnp.maximum(jnp.sum(tok[rows]), 1.0)
        return jnp.maximum(jnp.sum(valid[rows]), 1).astype(_f32)

    def reduce(x, rows):
        if spec.reduction == "token":
            return jnp.sum(x) / count(rows)
        return jnp.sum(jnp.where(valid[rows], x / denom[rows], 0.0)) / count(rows)

    def seq_mean(x, rows):  # mean of a per-sequence quantity over valid sequences
        v = valid[rows]
        return jnp.sum(jnp.where(v, x[rows], 0.0)) / jnp.maximum(jnp.sum(v), 1)

    lq_seq = _sg(sums["lq_label"]) / denom
    m: dict[str, Any] = {
        "student_logp_seq": lq_seq,
        "student_logp": seq_mean(lq_seq, both),
        "student_logp_tgo": seq_mean(lq_seq, t),
        "student_logp_sgo": seq_mean(lq_seq, s),
        "tokens_seq": tokens,
        "num_tokens": jnp.sum(tokens),
    }
    if "lp_label" in sums:
        lp_seq = _sg(sums["lp_label"]) / denom
        gap = sequence_gaps(lq_seq, lp_seq, b)
        m.update({
            "teacher_logp_seq": lp_seq,
            "teacher_logp": seq_mean(lp_seq, both),
            "teacher_logp_tgo": seq_mean(lp_seq, t),
            "teacher_logp_sgo": seq_mean(lp_seq, s),
            "gap": gap, "gap_t": gap[t], "gap_s": gap[s],
        })

    name = spec.name
    div = sums.get("div")
    if name == "distillm2":
        skl, srkl = reduce(div[t], t), reduce(div[s], s)
        if spec.normalization == "paper":
            loss = (1.0 - beta) * skl + beta * srkl
        else:  # authors' code: (2 - b_c) SKL + b_c SRKL with b_c = 2 b (twice the paper's value)
            loss = (2.0 - 2.0 * beta) * skl + 2.0 * beta * srkl
        parts = {"skl": skl, "srkl": srkl}
    elif name == "distillm":
        loss = reduce(div, both)
        parts = {"srkl": loss, "srkl_tgo": reduce(div[t], t), "srkl_sgo": reduce(div[s], s)}
    elif name == "kd":
        loss = reduce(div[t], t)
        parts = {"fkl": loss}
    elif name == "rkl":
        loss = reduce(div[s], s)
        parts = {"rkl": loss}
    elif name == "gkd":
        loss = reduce(div, both)
        parts = {"jsd": loss, "jsd_tgo": reduce(div[t], t), "jsd_sgo": reduce(div[s], s)}
    elif name in ("seqkd", "sft"):
        loss = reduce(-sums["lq_label"][t], t)
        parts = {"nll": loss}
    else:  # dpkd: length-averaged log-probs, one term per pair with both responses non-empty
        lq = sums["lq_label"] / denom
        lp = _sg(sums["lp_label"]) / denom
        z = beta * ((lq[t] - lq[s]) - (lp[t] - lp[s]))
        vp = valid[t] & valid[s]
        npairs = jnp.maximum(jnp.sum(vp) if denominators is None
                             else jnp.asarray(denominators["pairs"], _f32), 1)
        loss = jnp.sum(jnp.where(vp, -jax.nn.log_sigmoid(z), 0.0)) / npairs
        parts = {"dpkd_margin": _sg(jnp.sum(jnp.where(vp, z, 0.0)) / npairs),
                 "dpkd_accuracy": jnp.sum(vp & (z > 0)) / npairs}
    m.update({k: _sg(v) for k, v in parts.items()})
    m["loss"] = _sg(loss)
    return loss, m


def _shifted_labels(labels: jax.Array) -> jax.Array:
    """[N, T] -> [N, T]: position t holds the label that position t predicts (labels[t + 1]);
    the last position gets -100."""
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _check_labels(labels, rows, length, num_pairs, what):
    if labels.ndim != 2 or labels.shape != (rows, length):
        raise ValueError(f"labels: expected shape [{rows}, {length}] to match {what}, "
                         f"got {labels.shape}")
    if rows != 2 * num_pairs:
        raise ValueError(f"num_pairs={num_pairs}: {what} has {rows} rows, expected 2*num_pairs")


# --------------------------------------------------------------------------------------------
# Unchunked objective (logits given).
# --------------------------------------------------------------------------------------------
def objective(name: str, student_logits: jax.Array, teacher_logits: jax.Array | None,
              labels: jax.Array, *, num_pairs: int, alpha=0.1, beta=None,
              skew_stopgrad: bool = True, reduction: str = "sequence",
              normalization: str = "paper", denominators: dict | None = None
              ) -> tuple[jax.Array, dict]:
    """One objective on a paired batch of full logits.

    Args:
      name: one of ``OBJECTIVES``.
      student_logits, teacher_logits: [2B, T, V] (any float dtype; float32 inside). The caller
        slices both to the shared vocabulary. ``teacher_logits`` may be None for seqkd / sft.
      labels: [2B, T] int, -100 on prompt and padding (HF causal convention; shifted here).
      num_pairs: B (static). alpha: scalar or [2B] skew (stop-gradient). beta: CALD b (default
        0.5), GKD JSD weight (0.9) or DPKD temperature (0.1); ignored by the other objectives.
      skew_stopgrad: student inside the SRKL mixture is stop-gradient (authors' code).
      reduction: "sequence" (mean over sequences of per-sequence token means) or "token".
      normalization: "paper" ((1-b) SKL + b SRKL) or "authors_code" ((2-2b) SKL + 2b SRKL).
      denominators: batch-wide counts (``loss_denominators``) when this batch is one
        micro-batch of several; the micro-batch losses then add up to the whole batch's loss.

    Returns:
      (loss scalar, metrics dict); see docs/losses.md for the metric keys.
    """
    beta = _resolve_beta(name, beta)
    if student_logits.ndim != 3:
        raise ValueError(f"student_logits: expected [2B, T, V], got shape {student_logits.shape}")
    n, t, v = student_logits.shape
    if teacher_logits is not None:
        if teacher_logits.ndim != 3 or teacher_logits.shape[:2] != (n, t):
            raise ValueError(f"teacher_logits: expected shape [{n}, {t}, V], "
                             f"got {teacher_logits.shape}")
        if teacher_logits.shape[2] != v:
            raise ValueError(
                f"teacher_logits vocab width {teacher_logits.shape[2]} != student_logits width "
                f"{v}: slice both to the shared tokenizer vocabulary before calling")
    spec = _make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization,
                      teacher_logits is not None)
    _check_labels(labels, n, t, num_pairs, "student_logits")
    alpha = _alpha_rows(alpha, n)
    lab = labels[:, 1:]
    lq = log_softmax(student_logits[:, :-1])
    lp = None if teacher_logits is None else _sg(log_softmax(teacher_logits[:, :-1]))
    sums = _row_terms(spec, lq, lp, lab, alpha, beta)
    return _finalize(spec, sums, jnp.sum(lab != IGNORE_INDEX, axis=1), beta, denominators)


def sequence_logprobs(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array) -> dict[str, jax.Array]:
    """Per-sequence mean token log-probs of the labels (stop-gradient), for the a curriculum.

    [N, T, V] x2, [N, T] -> {"student_logp_seq": [N], "teacher_logp_seq": [N], "tokens_seq": [N]}.
    """
    n = student_logits.shape[0]
    if n % 2:
        raise ValueError(f"student_logits: expected an even number of rows (2B), got {n}")
    _, m = objective("dpkd", _sg(student_logits), _sg(teacher_logits), labels,
                     num_pairs=n // 2, beta=0.1)
    return {k: m[k] for k in ("student_logp_seq", "teacher_logp_seq", "tokens_seq")}


# --------------------------------------------------------------------------------------------
# Chunked fused objective (hidden states + head given).
# --------------------------------------------------------------------------------------------
class _ChunkSpec(NamedTuple):
    obj: _Spec
    student_softcap: float | None
    teacher_softcap: float | None
    need_dh: bool = True
    need_dw: bool = True
    dh_dtype: str = "float32"
    dw_dtype: str = "float32"


def _head_logits(h, w, softcap):
    """[N, C, H] @ [H, V] -> float32 [N, C, V], with optional soft-cap c*tanh(z/c)."""
    z = jnp.einsum("nch,hv->ncv", h, w, preferred_element_type=_f32)
    return _softcap(z, softcap)


def _softcap(z, c):
    return z if c is None else c * jnp.tanh(z / c)


def _to_chunks(x, chunk: int, n_chunks: int, fill):
    """[N, T, ...] -> [n_chunks, N, chunk, ...], padding T at the end with ``fill``."""
    pad = n_chunks * chunk - x.shape[1]
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _zeros_sums(spec: _Spec):
    return {k: jnp.zeros((2 * spec.num_pairs,), _f32) for k in _term_keys(spec)}


def _scan_sums(cs: _ChunkSpec, hs, ws, ht, wt, lab, alpha, beta, remat: bool):
    """Forward scan over chunks accumulating per-row sums (autodiff-able; remat per chunk)."""
    def chunk_terms(h_c, w_s, th_c, w_t, lab_c):
        lq = log_softmax(_head_logits(h_c, w_s, cs.student_softcap))
        lp = None
        if th_c is not None:
            lp = _sg(log_softmax(_head_logits(th_c, w_t, cs.teacher_softcap)))
        return _row_terms(cs.obj, lq, lp, lab_c, alpha, beta)

    if remat:
        chunk_terms = jax.checkpoint(chunk_terms)

    def body(carry, xs):
        h_c, th_c, lab_c = xs
        terms = jax.lax.cond(_has_labels(lab_c), chunk_terms, lambda *_: _zeros_sums(cs.obj),
                             h_c, ws, th_c, wt, lab_c)
        return jax.tree.map(jnp.add, carry, terms), None

    sums, _ = jax.lax.scan(body, _zeros_sums(cs.obj), (hs, ht, lab))
    return sums


def _has_labels(lab_c) -> jax.Array:
    """Whether a chunk holds any labelled position (label-free chunks skip their head matmuls)."""
    return jnp.any(lab_c != IGNORE_INDEX)


def _scan_grads(cs: _ChunkSpec, hs, ws, ht, wt, lab, alpha, beta, weights):
    """Scan computing per-row sums AND the gradient of sum_k <weights_k, sums_k> w.r.t. the
    student hidden chunks and head, one chunk at a time (no recompute in the backward pass).

    Returns (sums, dh [n_chunks, N, C, H] float32 or None, dw [H, V] float32 or None).
    """
    mm_dtype = jnp.result_type(hs.dtype, ws.dtype)

    def chunk(carry, h_c, th_c, lab_c):
        sums, dw = carry
        zc = _head_logits(h_c, ws, cs.student_softcap)
        zt = None if th_c is None else _sg(_head_logits(th_c, wt, cs.teacher_softcap))
        terms, dz = _terms_and_logit_grad(cs.obj, zc, zt, lab_c, alpha, beta, weights,
                                          cs.student_softcap)
        dz = dz.astype(mm_dtype)
        dh_c = None
        if cs.need_dh:
            dh_c = jnp.einsum("ncv,hv->nch", dz, ws, preferred_element_type=_f32)
        if cs.need_dw:
            dw = _accumulate_dw(dw, h_c, dz)
        return (jax.tree.map(jnp.add, sums, terms), dw), dh_c

    def skip(carry, h_c, th_c, lab_c):
        return carry, (jnp.zeros(h_c.shape, _f32) if cs.need_dh else None)

    def body(carry, xs):
        h_c, th_c, lab_c = xs
        return jax.lax.cond(_has_labels(lab_c), chunk, skip, carry, h_c, th_c, lab_c)

    dw0 = jnp.zeros(ws.shape, _f32) if cs.need_dw else None
    (sums, dw), dh = jax.lax.scan(body, (_zeros_sums(cs.obj), dw0), (hs, ht, lab))
    return sums, dh, dw


def _vocab_tiles(v: int, n_tiles: int) -> tuple[int, int, int]:
    """(tile width, number of full tiles, width of the remainder tile) for a vocab of v."""
    vt = -(-v // n_tiles)
    n_full = v // vt
    return vt, n_full, v - n_full * vt


def _terms_and_logit_grad(spec: _Spec, zc, zt, labels, alpha, beta, weights, softcap):
    """Per-row sums (as ``_row_terms``) and d(sum_k <weights_k, sums_k>)/d(raw student logits).

    zc: [N, C, V] float32 student logits after the soft-cap; zt: [N, C, V] teacher logits or
    None. Autodiff runs per vocab tile with the log-sum-exps held fixed (every term is a sum
    over the vocab): pass 1 gets the direct gradient g = d/d(lq) tile by tile, written into one
    [N, C, V] buffer, and sum_v g; pass 2 applies the log-softmax backward
    dzc = g - softmax(zc) * sum_v g (and the soft-cap's 1 - (zc/c)^2) in place. So a chunk holds
    three [N, C, V] float32 buffers (zc, zt, gradient) plus tile-sized temporaries, where
    autodiff of the whole chunk would hold five or six.
    """
    n, c, v = zc.shape
    lse = jax.nn.logsumexp(zc, axis=-1, keepdims=True)
    lse_t = None if zt is None else jax.nn.logsumexp(zt, axis=-1, keepdims=True)
    vt, n_full, rem = _vocab_tiles(v, _VOCAB_TILES)

    def pass1(start, width, carry):
        sums, gsum, g_all = carry
        lq = jax.lax.dynamic_slice_in_dim(zc, start, width, axis=2) - lse
        lp = None if zt is None else (
            jax.lax.dynamic_slice_in_dim(zt, start, width, axis=2) - lse_t)
        terms, vjp = jax.vjp(
            lambda x: _row_terms(spec, x, lp, labels, alpha, beta, vocab_offset=start), lq)
        (g,) = vjp(weights)
        sums = jax.tree.map(jnp.add, sums, terms)
        gsum = gsum + jnp.sum(g, axis=-1, keepdims=True)
        return sums, gsum, jax.lax.dynamic_update_slice_in_dim(g_all, g, start, axis=2)

    def pass2(start, width, g_all):
        g = jax.lax.dynamic_slice_in_dim(g_all, start, width, axis=2)
        z = jax.lax.dynamic_slice_in_dim(zc, start, width, axis=2)
        dz = g - jnp.exp(z - lse) * gsum
        if softcap is not None:
            dz = dz * (1.0 - jnp.square(z / softcap))
        return jax.lax.dynamic_update_slice_in_dim(g_all, dz, start, axis=2)

    carry = (_zeros_sums(spec), jnp.zeros((n, c, 1), _f32), jnp.zeros((n, c, v), _f32))
    carry = jax.lax.fori_loop(0, n_full, lambda i, cr: pass1(i * vt, vt, cr), carry)
    if rem:
        carry = pass1(n_full * vt, rem, carry)
    sums, gsum, g_all = carry
    g_all = jax.lax.fori_loop(0, n_full, lambda i, ga: pass2(i * vt, vt, ga), g_all)
    if rem:
        g_all = pass2(n_full * vt, rem, g_all)
    return sums, g_all


def _accumulate_dw(dw, h_c, dz, n_tiles: int = _VOCAB_TILES):
    """dw [H, V] += h_c^T dz over vocab tiles, updated in place.

    A single ``einsum`` would allocate a second [H, V] float32 buffer for the chunk's
    contribution before adding it to the accumulator; tiling the vocab axis keeps that
    temporary at [H, V / n_tiles].
    """
    v = dw.shape[1]
    vt, n_full, rem = _vocab_tiles(v, n_tiles)

    def tile(start, acc):
        upd = jnp.einsum("nch,ncv->hv", h_c, jax.lax.dynamic_slice_in_dim(dz, start, vt, axis=2),
                         preferred_element_type=_f32)
        cur = jax.lax.dynamic_slice_in_dim(acc, start, vt, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(acc, cur + upd, start, axis=1)

    dw = jax.lax.fori_loop(0, n_full, lambda i, acc: tile(i * vt, acc), dw)
    if rem:
        start = n_full * vt
        upd = jnp.einsum("nch,ncv->hv", h_c, dz[:, :, start:], preferred_element_type=_f32)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw[:, start:] + upd, start, axis=1)
    return dw


def _fused_primal(cs: _ChunkSpec, hs, ws, ht, wt, lab, tokens, alpha, beta, denoms):
    sums = _scan_sums(cs, hs, ws, ht, wt, lab, alpha, beta, remat=False)
    return _finalize(cs.obj, sums, tokens, beta, denoms)


_fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0,))


def _fused_fwd(cs: _ChunkSpec, hs, ws, ht, wt, lab, tokens, alpha, beta, denoms):
    # symbolic_zeros=True: every leaf arrives as CustomVJPPrimal(value, perturbed).
    val = lambda x: jax.tree.map(lambda p: p.value, x)  # noqa: E731
    need_dh, need_dw = hs.perturbed, ws.perturbed
    hs, ws, ht, wt, lab, tokens, alpha, beta, denoms = map(
        val, (hs, ws, ht, wt, lab, tokens, alpha, beta, denoms))
    cs = cs._replace(need_dh=need_dh, need_dw=need_dw)
    loss_of = lambda s: _finalize(cs.obj, s, tokens, beta, denoms)[0]  # noqa: E731
    if cs.obj.name in _NONLINEAR:
        sums = _scan_sums(cs, hs, ws, ht, wt, lab, alpha, beta, remat=False)
        weights = jax.grad(loss_of)(sums)
        # Second pass needs the student only (the teacher terms carry no gradient).
        cs2 = cs._replace(obj=cs.obj._replace(has_teacher=False))
        w2 = {k: v for k, v in weights.items() if k != "lp_label"}
        _, dh, dw = _scan_grads(cs2, hs, ws, None, None, lab, alpha, beta, w2)
    else:
        # The loss is linear in the per-row sums: d loss / d sums depends on token counts only.
        weights = jax.grad(loss_of)(_zeros_sums(cs.obj))
        sums, dh, dw = _scan_grads(cs, hs, ws, ht, wt, lab, alpha, beta, weights)
    out = _finalize(cs.obj, sums, tokens, beta, denoms)
    return out, (dh, dw)


def _fused_bwd(cs: _ChunkSpec, res, g):
    dh, dw = res
    g_loss = g[0]
    if isinstance(g_loss, jax.custom_derivatives.SymbolicZero):
        g_loss = jnp.zeros((), _f32)
    ddh = None if dh is None else (g_loss * dh).astype(cs.dh_dtype)
    ddw = None if dw is None else (g_loss * dw).astype(cs.dw_dtype)
    # Cotangents for (hs, ws, ht, wt, lab, tokens, alpha, beta, denoms): teacher, alpha, beta
    # are stop-gradient by definition; labels and counts are integers.
    return (ddh, ddw, None, None, None, None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def chunked_objective(name: str, student_hidden: jax.Array, student_head: jax.Array,
                      teacher_hidden: jax.Array | None, teacher_head: jax.Array | None,
                      labels: jax.Array, *, num_pairs: int, chunk_size: int = 128,
                      student_softcap: float | None = None, teacher_softcap: float | None = None,
                      alpha=0.1, beta=None, skew_stopgrad: bool = True,
                      reduction: str = "sequence", normalization: str = "paper",
                      grad_mode: str = "fused", denominators: dict | None = None
                      ) -> tuple[jax.Array, dict]:
    """``objective`` computed from final hidden states and output heads, chunk by chunk.

    Never holds [2B, T, V] arrays, forward or backward: it walks the sequence in ``chunk_size``
    positions with ``lax.scan``, computing float32 logits ``h @ W`` (soft-capped if a cap is given)
    per chunk and accumulating per-sequence sums; reductions happen at the end, so the result
    equals ``objective(name, softcap(hs @ Ws), softcap(ht @ Wt), labels, ...)``. The chunk grid
    starts at the batch's first label, and chunks with no label skip their head matmuls.

    Args:
      student_hidden: [2B, T, H]; student_head: [H, V] (e.g. the embedding transposed if tied).
      teacher_hidden: [2B, T, Ht]; teacher_head: [Ht, V]. Stop-gradient. None for seqkd / sft.
      labels: [2B, T] int, -100 on prompt and padding (shifted here).
      chunk_size: positions per chunk (T is padded internally to a multiple). The fused path
        holds about 3 * 2B * chunk_size * V float32 values per chunk (plus the [H, V] head
        gradient): e.g. 2B = 4, V = 151936, chunk 64 -> 0.5 GiB.
      student_softcap, teacher_softcap: final-logit soft-cap c (Gemma2), or None.
      grad_mode: "fused" (default) computes the head gradients inside the forward scan through a
        custom VJP, so the backward pass does no recompute: 2 head matmuls forward + 2 backward
        per chunk, like the unchunked loss. Only first-order reverse-mode differentiation w.r.t.
        the student inputs is supported; metrics carry no gradient. "remat" is plain autodiff
        of a scan with ``jax.checkpoint`` per chunk (any transform works; recomputes the
        forward head matmuls in the backward pass).
      denominators: batch-wide counts from ``loss_denominators`` when this call is one
        micro-batch of several (the micro-batch losses then add up to the batch's loss).
      Other options: as in ``objective``.

    Returns:
      (loss, metrics) as ``objective``.
    """
    beta = _resolve_beta(name, beta)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r}: choose one of {GRAD_MODES}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive int")
    if student_hidden.ndim != 3:
        raise ValueError(f"student_hidden: expected [2B, T, H], got shape {student_hidden.shape}")
    n, t, h = student_hidden.shape
    if student_head.ndim != 2 or student_head.shape[0] != h:
        raise ValueError(f"student_head: expected [{h}, V], got shape {student_head.shape}")
    v = student_head.shape[1]
    has_teacher = teacher_hidden is not None
    if has_teacher != (teacher_head is not None):
        raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
    if has_teacher:
        if teacher_hidden.ndim != 3 or teacher_hidden.shape[:2] != (n, t):
            raise ValueError(f"teacher_hidden: expected [{n}, {t}, Ht], "
                             f"got shape {teacher_hidden.shape}")
        if teacher_head.ndim != 2 or teacher_head.shape[0] != teacher_hidden.shape[2]:
            raise ValueError(f"teacher_head: expected [{teacher_hidden.shape[2]}, V], "
                             f"got shape {teacher_head.shape}")
        if teacher_head.shape[1] != v:
            raise ValueError(
                f"teacher_head vocab width {teacher_head.shape[1]} != student_head width {v}: "
                f"slice both heads to the shared tokenizer vocabulary before calling")
    spec = _make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization, has_teacher)
    _check_labels(labels, n, t, num_pairs, "student_hidden")
    alpha = _alpha_rows(alpha, n)
    beta_arr = jnp.asarray(beta if spec.beta_static is None else 0.0, _f32)
    cs = _ChunkSpec(spec, student_softcap, teacher_softcap)

    chunk = min(chunk_size, t)
    n_chunks = math.ceil(t / chunk)
    lab = _shifted_labels(labels)
    tokens = jnp.sum(lab != IGNORE_INDEX, axis=1)
    # Start the chunk grid at the first labelled position of the batch (positions before it are
    # prompt in every row; rolled to the end, they and trailing padding fill label-free chunks,
    # which skip their head matmuls).
    start = first_label(lab)
    align = lambda x: jnp.roll(x, -start, axis=1)  # noqa: E731
    lab_c = _to_chunks(align(lab), chunk, n_chunks, IGNORE_INDEX)
    # roll and _to_chunks are linear: autodiff maps the chunked cotangent back to [2B, T, H].
    hs = _to_chunks(align(student_hidden), chunk, n_chunks, 0)
    ht = wt = None
    if has_teacher:
        ht = _to_chunks(align(_sg(teacher_hidden)), chunk, n_chunks, 0)
        wt = _sg(teacher_head)
    if grad_mode == "remat":
        sums = _scan_sums(cs, hs, student_head, ht, wt, lab_c, alpha, beta_arr, remat=True)
        return _finalize(spec, sums, tokens, beta_arr, denominators)
    cs = cs._replace(dh_dtype=jnp.dtype(hs.dtype).name,
                     dw_dtype=jnp.dtype(student_head.dtype).name)
    return _fused(cs, hs, student_head, ht, wt, lab_c, tokens, alpha, beta_arr, denominators)


def first_label(lab: jax.Array) -> jax.Array:
    """The first position holding a label in any row (0 when there is none)."""
    has = lab != IGNORE_INDEX
    first = jnp.where(jnp.any(has, axis=1), jnp.argmax(has, axis=1), lab.shape[1])
    return jnp.where(jnp.any(has), jnp.min(first), 0).astype(jnp.int32)


def chunked_sequence_logprobs(student_hidden: jax.Array, student_head: jax.Array,
                              teacher_hidden: jax.Array | None, teacher_head: jax.Array | None,
                              labels: jax.Array, *, chunk_size: int = 128,
                              student_softcap: float | None = None,
                              teacher_softcap: float | None = None) -> dict[str, jax.Array]:
    """Per-sequence mean label log-probs from hidden states, chunked, forward only.

    For the a curriculum, which needs the current batch's gaps before the loss: one extra head
    matmul + logsumexp per model (no backward). [N, T, H], [H, V] (x2), [N, T] ->
    {"student_logp_seq": [N], "teacher_logp_seq": [N], "tokens_seq": [N]}. With no teacher
    (teacher_hidden = teacher_head = None) only the given model's head runs, and the result has
    no "teacher_logp_seq": the trainer computes a frozen teacher's values once per epoch this
    way (pass the teacher as the "student").
    """
    n = student_hidden.shape[0]
    if n % 2:
        raise ValueError(f"student_hidden: expected an even number of rows (2B), got {n}")
    has_teacher = teacher_hidden is not None
    _, m = chunked_objective("dpkd" if has_teacher else "sft", _sg(student_hidden), _sg(student_head),
                             teacher_hidden, teacher_head, labels, num_pairs=n // 2,
                             chunk_size=chunk_size, student_softcap=student_softcap,
                             teacher_softcap=teacher_softcap, grad_mode="remat")
    keys = ("student_logp_seq", "teacher_logp_seq", "tokens_seq") if has_teacher else (
        "student_logp_seq", "tokens_seq")
    return {k: m[k] for k in keys}
