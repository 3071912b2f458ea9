"""DPO and IPO: preference optimisation of the student (the policy) against a frozen reference
model that sits in the teacher's slot (`Objective.reference`), on given preference pairs: rows
[0:B] are the chosen responses, rows [B:2B] the rejected ones (`objectives.terms`).

With lq / lp the policy's / reference's log-probability of a response, the implicit reward of a
response is beta * (lq - lp), and h = (lq_c - lp_c) - (lq_r - lp_r).

* DPO (Rafailov et al., 2023), TRL's "sigmoid" loss, with conservative label smoothing eps
  (the chosen label is wrong with probability eps):
  (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h); lq, lp are SUMS over the
  response tokens.
* IPO (Azar et al., 2023), TRL's "ipo" loss: (h - 1 / (2 beta))^2, with lq, lp the per-token
  MEANS over the response (as TRL computes them for IPO).

Each loss is a mean over the pairs whose two responses both have tokens (batch-wide under
gradient accumulation, like DPKD). `objective.reduction` and `objective.normalization` do not
apply. The metrics are TRL's: the mean chosen and rejected rewards, their margin, and the
fraction of pairs whose chosen reward is the larger (all with DPO's / IPO's own lq, lp).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distillm2_jax.objectives.base import Objective, Reduction

PARTS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

_f32 = jnp.float32
_sg = jax.lax.stop_gradient


def _logratios(r: Reduction, sums: dict, per_token: bool) -> tuple[jax.Array, jax.Array]:
    """(lq_c - lp_c, lq_r - lp_r) [B] each; the reference's log-probs carry no gradient."""
    lq, lp = sums["lq_label"], _sg(sums["lp_label"])
    if per_token:
        lq, lp = lq / r.denom, lp / r.denom
    c, s = r.slices["tgo"], r.slices["sgo"]
    return lq[c] - lp[c], lq[s] - lp[s]


def _reduce(r: Reduction, losses: jax.Array, chosen: jax.Array, rejected: jax.Array, beta):
    """The mean loss over valid pairs and TRL's reward metrics."""
    valid, count = r.pairs()

    def mean(x):
        return jnp.sum(jnp.where(valid, x, 0.0)) / count

    reward_c, reward_r = _sg(beta * chosen), _sg(beta * rejected)
    return mean(losses), {"reward_chosen": mean(reward_c), "reward_rejected": mean(reward_r),
                          "reward_margin": mean(reward_c - reward_r),
                          "reward_accuracy": mean((reward_c > reward_r).astype(_f32))}


def dpo_loss(r: Reduction, sums: dict, beta, normalization: str, label_smoothing: float = 0.0):
    """DPO with conservative label smoothing (module docstring); log-prob sums per response."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r}: must be in [0, 0.5)")
    chosen, rejected = _logratios(r, sums, per_token=False)
    z = beta * (chosen - rejected)
    losses = -jax.nn.log_sigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * jax.nn.log_sigmoid(-z)
    return _reduce(r, losses, chosen, rejected, beta)


def ipo_loss(r: Reduction, sums: dict, beta, normalization: str):
    """IPO (module docstring); per-token mean log-probs per response."""
    chosen, rejected = _logratios(r, sums, per_token=True)
    losses = jnp.square(chosen - rejected - 1.0 / (2.0 * beta))
    return _reduce(r, losses, chosen, rejected, beta)


DPO = Objective(
    "dpo", "DPO", "DPO: preference pairs against a frozen reference (default: the starting student)",
    needs_teacher=True, student_responses=False, loss=dpo_loss, parts=PARTS, beta="dpo_beta",
    default_beta=0.1, linear=False, reference=True, options=("label_smoothing",))

IPO = Objective(
    "ipo", "IPO", "IPO: squared preference margin against a frozen reference (per-token means)",
    needs_teacher=True, student_responses=False, loss=ipo_loss, parts=PARTS, beta="dpo_beta",
    default_beta=0.1, linear=False, reference=True)
