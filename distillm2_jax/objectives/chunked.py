"""The chunked objective: the loss from final hidden states and output heads, walking the
sequence chunk by chunk so that no [2B, T, V] logits exist, forward or backward.

The fused path (default) computes the head gradients inside the forward scan through a custom
VJP (no recompute in the backward pass); "remat" is plain autodiff of a checkpointed scan.
`label_logprobs` is the same walk for label log-probabilities alone (evaluation, the curriculum's
gaps, DPO-style losses). Per-row terms and reductions come from `terms`, as in the unchunked
`reference.objective`, so the two agree by construction.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distillm2_jax.objectives import registry, terms
from distillm2_jax.objectives.divergences import log_softmax

GRAD_MODES = ("fused", "remat")
# Vocab tiles inside a chunk of the fused path (gradient passes and head-gradient update).
_VOCAB_TILES = 16

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


class _ChunkSpec(NamedTuple):
    obj: terms.Spec
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


def chunk_by_labels(lab: jax.Array, chunk_size: int, *arrays):
    """Labels [N, T] (already shifted: position t scores lab[t]) and arrays [N, T, ...] ->
    (labels [n_chunks, N, C], arrays [n_chunks, N, C, ...]) for a `lax.scan` over chunks.

    The chunk grid starts at the batch's first labelled position: the positions before it are
    prompt in every row; rolled to the end, they and trailing padding fill label-free chunks,
    which a scan can skip (`lax.cond` on `jnp.any(labels != -100)`). Roll and padding are linear,
    so autodiff maps a chunked cotangent back to [N, T, ...]. None arrays stay None.
    """
    t = lab.shape[1]
    chunk = min(chunk_size, t)
    n_chunks = math.ceil(t / chunk)
    start = first_label(lab)

    def split(x, fill):
        return None if x is None else _to_chunks(jnp.roll(x, -start, axis=1), chunk, n_chunks, fill)

    return split(lab, terms.IGNORE_INDEX), tuple(split(x, 0) for x in arrays)


def _scan_sums(cs: _ChunkSpec, hs, ws, ht, wt, lab, alpha, beta, remat: bool):
    """Forward scan over chunks accumulating per-row sums (autodiff-able; remat per chunk)."""
    def chunk_terms(h_c, w_s, th_c, w_t, lab_c):
        lq = log_softmax(_head_logits(h_c, w_s, cs.student_softcap))
        lp = None
        if th_c is not None:
            lp = _sg(log_softmax(_head_logits(th_c, w_t, cs.teacher_softcap)))
        return terms.row_terms(cs.obj, lq, lp, lab_c, alpha, beta)

    if remat:
        chunk_terms = jax.checkpoint(chunk_terms)

    def body(carry, xs):
        h_c, th_c, lab_c = xs
        got = jax.lax.cond(_has_labels(lab_c), chunk_terms, lambda *_: terms.zeros_sums(cs.obj),
                             h_c, ws, th_c, wt, lab_c)
        return jax.tree.map(jnp.add, carry, got), None

    sums, _ = jax.lax.scan(body, terms.zeros_sums(cs.obj), (hs, ht, lab))
    return sums


def _has_labels(lab_c) -> jax.Array:
    """Whether a chunk holds any labelled position (label-free chunks skip their head matmuls)."""
    return jnp.any(lab_c != terms.IGNORE_INDEX)


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
        got, dz = _terms_and_logit_grad(cs.obj, zc, zt, lab_c, alpha, beta, weights,
                                          cs.student_softcap)
        dz = dz.astype(mm_dtype)
        dh_c = None
        if cs.need_dh:
            dh_c = jnp.einsum("ncv,hv->nch", dz, ws, preferred_element_type=_f32)
        if cs.need_dw:
            dw = _accumulate_dw(dw, h_c, dz)
        return (jax.tree.map(jnp.add, sums, got), dw), dh_c

    def skip(carry, h_c, th_c, lab_c):
        return carry, (jnp.zeros(h_c.shape, _f32) if cs.need_dh else None)

    def body(carry, xs):
        h_c, th_c, lab_c = xs
        return jax.lax.cond(_has_labels(lab_c), chunk, skip, carry, h_c, th_c, lab_c)

    dw0 = jnp.zeros(ws.shape, _f32) if cs.need_dw else None
    (sums, dw), dh = jax.lax.scan(body, (terms.zeros_sums(cs.obj), dw0), (hs, ht, lab))
    return sums, dh, dw


def _vocab_tiles(v: int, n_tiles: int) -> tuple[int, int, int]:
    """(tile width, number of full tiles, width of the remainder tile) for a vocab of v."""
    vt = -(-v // n_tiles)
    n_full = v // vt
    return vt, n_full, v - n_full * vt


def _terms_and_logit_grad(spec: terms.Spec, zc, zt, labels, alpha, beta, weights, softcap):
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
        got, vjp = jax.vjp(
            lambda x: terms.row_terms(spec, x, lp, labels, alpha, beta, vocab_offset=start), lq)
        (g,) = vjp(weights)
        sums = jax.tree.map(jnp.add, sums, got)
        gsum = gsum + jnp.sum(g, axis=-1, keepdims=True)
        return sums, gsum, jax.lax.dynamic_update_slice_in_dim(g_all, g, start, axis=2)

    def pass2(start, width, g_all):
        g = jax.lax.dynamic_slice_in_dim(g_all, start, width, axis=2)
        z = jax.lax.dynamic_slice_in_dim(zc, start, width, axis=2)
        dz = g - jnp.exp(z - lse) * gsum
        if softcap is not None:
            dz = dz * (1.0 - jnp.square(z / softcap))
        return jax.lax.dynamic_update_slice_in_dim(g_all, dz, start, axis=2)

    carry = (terms.zeros_sums(spec), jnp.zeros((n, c, 1), _f32), jnp.zeros((n, c, v), _f32))
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
    return terms.finalize(cs.obj, sums, tokens, beta, denoms)


_fused = jax.custom_vjp(_fused_primal, nondiff_argnums=(0,))


def _fused_fwd(cs: _ChunkSpec, hs, ws, ht, wt, lab, tokens, alpha, beta, denoms):
    # symbolic_zeros=True: every leaf arrives as CustomVJPPrimal(value, perturbed).
    val = lambda x: jax.tree.map(lambda p: p.value, x)  # noqa: E731
    need_dh, need_dw = hs.perturbed, ws.perturbed
    hs, ws, ht, wt, lab, tokens, alpha, beta, denoms = map(
        val, (hs, ws, ht, wt, lab, tokens, alpha, beta, denoms))
    cs = cs._replace(need_dh=need_dh, need_dw=need_dw)
    loss_of = lambda s: terms.finalize(cs.obj, s, tokens, beta, denoms)[0]  # noqa: E731
    if not registry.get(cs.obj.name).linear:
        sums = _scan_sums(cs, hs, ws, ht, wt, lab, alpha, beta, remat=False)
        weights = jax.grad(loss_of)(sums)
        # Second pass needs the student only (the teacher terms carry no gradient).
        cs2 = cs._replace(obj=cs.obj._replace(has_teacher=False))
        w2 = {k: v for k, v in weights.items() if k != "lp_label"}
        _, dh, dw = _scan_grads(cs2, hs, ws, None, None, lab, alpha, beta, w2)
    else:
        # The loss is linear in the per-row sums: d loss / d sums depends on token counts only.
        weights = jax.grad(loss_of)(terms.zeros_sums(cs.obj))
        sums, dh, dw = _scan_grads(cs, hs, ws, ht, wt, lab, alpha, beta, weights)
    out = terms.finalize(cs.obj, sums, tokens, beta, denoms)
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
                      grad_mode: str = "fused", denominators: dict | None = None,
                      options: dict | None = None) -> tuple[jax.Array, dict]:
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
      options: the objective's static loss options (``Objective.options``), e.g.
        {"label_smoothing": 0.1} for dpo.
      Other options: as in ``objective``.

    Returns:
      (loss, metrics) as ``objective``.
    """
    beta = terms.resolve_beta(name, beta)
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
        terms.check_vocab(teacher_head.shape[1], v, "teacher_head", "student_head")
    spec = terms.make_spec(name, num_pairs, beta, skew_stopgrad, reduction, normalization, has_teacher,
                           options)
    terms.check_labels(labels, n, t, num_pairs, "student_hidden")
    alpha = terms.alpha_rows(alpha, n)
    beta_arr = jnp.asarray(beta if spec.beta_static is None else 0.0, _f32)
    cs = _ChunkSpec(spec, student_softcap, teacher_softcap)

    lab = terms.shifted_labels(labels)
    tokens = jnp.sum(lab != terms.IGNORE_INDEX, axis=1)
    lab_c, (hs, ht) = chunk_by_labels(lab, chunk_size, student_hidden,
                                      None if not has_teacher else _sg(teacher_hidden))
    wt = _sg(teacher_head) if has_teacher else None
    if grad_mode == "remat":
        sums = _scan_sums(cs, hs, student_head, ht, wt, lab_c, alpha, beta_arr, remat=True)
        return terms.finalize(spec, sums, tokens, beta_arr, denominators)
    cs = cs._replace(dh_dtype=jnp.dtype(hs.dtype).name,
                     dw_dtype=jnp.dtype(student_head.dtype).name)
    return _fused(cs, hs, student_head, ht, wt, lab_c, tokens, alpha, beta_arr, denominators)


def first_label(lab: jax.Array) -> jax.Array:
    """The first position holding a label in any row (0 when there is none)."""
    has = lab != terms.IGNORE_INDEX
    first = jnp.where(jnp.any(has, axis=1), jnp.argmax(has, axis=1), lab.shape[1])
    return jnp.where(jnp.any(has), jnp.min(first), 0).astype(jnp.int32)




def label_logprobs(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, chunk_size: int = 128,
                   softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-row sums of the labels' log-probabilities under one model, chunked (no [N, T, V]).

    hidden [N, T, H] (final hidden states), head [H, V], labels [N, T] int with -100 where there
    is nothing to score (unshifted: position t's state predicts labels[t + 1]). Returns
    (logp_sum [N] float32, tokens [N] int32); the mean log-prob of a row is
    logp_sum / max(tokens, 1). Differentiable w.r.t. hidden and head (checkpointed per chunk),
    so DPO-style losses can use it; wrap the inputs in stop_gradient for evaluation.
    """
    if hidden.ndim != 3 or head.ndim != 2 or head.shape[0] != hidden.shape[2]:
        raise ValueError(f"hidden [N, T, H] and head [H, V] expected, got {hidden.shape} and {head.shape}")
    n, t, _ = hidden.shape
    if labels.shape != (n, t):
        raise ValueError(f"labels: expected shape [{n}, {t}] to match hidden, got {labels.shape}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive int")
    # One "pair" per row pair keeps the shared core's [2B] row convention; an odd N gets one
    # label-free row that is dropped again.
    odd = n % 2
    if odd:
        hidden = jnp.pad(hidden, ((0, 1), (0, 0), (0, 0)))
        labels = jnp.pad(labels, ((0, 1), (0, 0)), constant_values=terms.IGNORE_INDEX)
    rows = n + odd
    spec = terms.make_spec(terms.LABELS_ONLY, rows // 2, 0.0, True, "sequence", "paper", False)
    cs = _ChunkSpec(spec, softcap, None)
    lab = terms.shifted_labels(labels)
    lab_c, (hs,) = chunk_by_labels(lab, chunk_size, hidden)
    alpha = jnp.zeros((rows,), _f32)
    sums = _scan_sums(cs, hs, head, None, None, lab_c, alpha, jnp.zeros((), _f32), remat=True)
    tokens = jnp.sum(lab != terms.IGNORE_INDEX, axis=1).astype(jnp.int32)
    return sums["lq_label"][:n], tokens[:n]


def chunked_sequence_logprobs(student_hidden: jax.Array, student_head: jax.Array,
                              teacher_hidden: jax.Array | None, teacher_head: jax.Array | None,
                              labels: jax.Array, *, chunk_size: int = 128,
                              student_softcap: float | None = None,
                              teacher_softcap: float | None = None) -> dict[str, jax.Array]:
    """Per-sequence mean label log-probs of the student (and teacher), forward only.

    For the a curriculum, which needs the current batch's gaps before the loss: one extra head
    matmul + logsumexp per model (no backward). [N, T, H], [H, V] (x2), [N, T] ->
    {"student_logp_seq": [N], "teacher_logp_seq": [N], "tokens_seq": [N]}. With no teacher
    (teacher_hidden = teacher_head = None) the result has no "teacher_logp_seq": the trainer
    computes a frozen teacher's values once per epoch this way (pass the teacher as the "student").
    """
    if student_hidden.shape[0] % 2:
        raise ValueError(f"student_hidden: expected an even number of rows (2B), "
                         f"got {student_hidden.shape[0]}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head must both be given or both be None")
    s, tokens = label_logprobs(_sg(student_hidden), _sg(student_head), labels, chunk_size=chunk_size,
                               softcap=student_softcap)
    denom = jnp.maximum(tokens.astype(_f32), 1.0)
    out = {"student_logp_seq": s / denom, "tokens_seq": tokens}
    if teacher_hidden is not None:
        lp, _ = label_logprobs(_sg(teacher_hidden), _sg(teacher_head), labels, chunk_size=chunk_size,
                               softcap=teacher_softcap)
        out["teacher_logp_seq"] = lp / denom
    return out
