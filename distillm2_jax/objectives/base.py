"""What an objective is: one `Objective` record per method, and the `Reduction` its loss uses.

An objective contributes two pure functions to the shared loss core (`terms`):
* ``divergence(lp, lq, rows)``: its per-token divergence ([N, C, V] log-probs -> [N, C]), summed
  per row over the response positions of the rows it trains on (``rows.trained``); None for
  objectives made of label log-probs only (SeqKD, SFT, DPKD);
* ``loss(r, sums, beta, normalization, **options)``: the scalar loss and its named parts from the
  per-row sums ({"lq_label", "lp_label", "div"}: [2B] each), reduced with ``r``; ``options`` are
  the static keyword arguments the record declares (`Objective.options`).
The core never branches on an objective's name; the chunked and unchunked paths call the same two
functions, so they agree by construction.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

_f32 = jnp.float32

RowSet = Literal["tgo", "sgo", "all"]


class Rows(NamedTuple):
    """What a divergence may need to know about the rows of a chunk ([N, 1] each, traced)."""
    tgo: jax.Array           # bool: the row is a teacher-generated response (rows [0:B])
    alpha: jax.Array         # float32: the row's skew a (stop-gradient)
    beta: Any                # the objective's beta: a Python float when static, else a traced []
    skew_stopgrad: bool      # the student inside a skewed mixture is stop-gradient


class Reduction:
    """Reduces per-row sums [2B] to batch means: per-sequence token means averaged over the
    sequences that have response tokens (``reduction="sequence"``), or a global token mean
    ("token"). With ``denominators`` (`terms.loss_denominators`) the counts are those of the whole
    accumulated batch, so micro-batch losses add up to the batch's loss."""

    def __init__(self, tokens: jax.Array, num_pairs: int, reduction: str,
                 denominators: dict | None):
        self.tokens = tokens
        self.valid = tokens > 0
        self.denom = jnp.maximum(tokens.astype(_f32), 1.0)   # per-row token count, at least 1
        self.reduction = reduction
        self.denominators = denominators
        b = num_pairs
        self.slices = {"tgo": slice(0, b), "sgo": slice(b, 2 * b), "all": slice(0, 2 * b)}

    def count(self, rows: RowSet) -> jax.Array:
        """The divisor of a mean over `rows`: sequences with tokens, or tokens."""
        if self.denominators is not None:
            return jnp.maximum(jnp.asarray(self.denominators[rows], _f32), 1.0)
        sl = self.slices[rows]
        if self.reduction == "token":
            return jnp.maximum(jnp.sum(self.tokens[sl].astype(_f32)), 1.0)
        return jnp.maximum(jnp.sum(self.valid[sl]), 1).astype(_f32)

    def mean(self, x: jax.Array, rows: RowSet) -> jax.Array:
        """The batch mean over `rows` of a per-row sum x [2B] (e.g. sums["div"])."""
        sl = self.slices[rows]
        if self.reduction == "token":
            return jnp.sum(x[sl]) / self.count(rows)
        return jnp.sum(jnp.where(self.valid[sl], x[sl] / self.denom[sl], 0.0)) / self.count(rows)

    def pairs(self) -> tuple[jax.Array, jax.Array]:
        """(valid [B]: both of a pair's responses have tokens, their count (at least 1))."""
        t, s = self.slices["tgo"], self.slices["sgo"]
        vp = self.valid[t] & self.valid[s]
        n = jnp.sum(vp) if self.denominators is None else jnp.asarray(self.denominators["pairs"], _f32)
        return vp, jnp.maximum(n, 1)


Divergence = Callable[[jax.Array, jax.Array, Rows], jax.Array]
Loss = Callable[..., tuple[jax.Array, dict]]   # (r, sums, beta, normalization, **options)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One distillation objective: what it trains on, what it needs, and its math."""
    name: str
    label: str                   # how tables and plots name it ("DistiLLM-2", "KD")
    summary: str
    needs_teacher: bool          # False: trains on given responses alone (the teacher may be absent)
    student_responses: bool      # reads student-generated rows (Algorithm 1 then samples them)
    loss: Loss
    parts: tuple[str, ...]       # the metric names `loss` returns besides "loss"
    divergence: Divergence | None = None
    trained: RowSet = "all"      # rows whose divergence is summed
    # where the step's `beta` input comes from: the b schedule (objective.beta_schedule from
    # objective.beta), a fixed config key, or nothing
    beta: Literal["schedule", "gkd_beta", "dpkd_beta", "dpo_beta", "none"] = "none"
    default_beta: float = 0.0    # `beta` when a caller of the loss passes None
    curriculum: bool = False     # objective.curriculum switches on the per-row a from epoch 2
    linear: bool = True          # the loss is linear in the per-row sums (the fused path then
                                 # needs one pass; a nonlinear one, DPKD, needs two)
    # the teacher slot holds a frozen reference policy (`model.reference`, by default the
    # starting student) instead of `model.teacher`, and training reads given pairs only (DPO)
    reference: bool = False
    # static `objective.<key>` config values the loss takes as keyword arguments
    # (`loss(r, sums, beta, normalization, **options)`), e.g. DPO's ("label_smoothing",)
    options: tuple[str, ...] = ()
