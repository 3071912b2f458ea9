"""DistiLLM-2's contrastive loss (CALD): (1 - b) SKL_a on teacher responses + b SRKL_a on the
student's own responses (paper Eq. 2), with the b schedule and the per-row a curriculum."""
from __future__ import annotations

from distillm2_jax.objectives import divergences
from distillm2_jax.objectives.base import Objective, Reduction, Rows


def divergence(lp, lq, rows: Rows):
    return divergences.skew_kl_or_reverse(lp, lq, rows.alpha, rows.tgo, rows.skew_stopgrad)


def loss(r: Reduction, sums: dict, beta, normalization: str):
    skl, srkl = r.mean(sums["div"], "tgo"), r.mean(sums["div"], "sgo")
    if normalization == "paper":
        total = (1.0 - beta) * skl + beta * srkl
    else:  # authors' code: (2 - b_c) SKL + b_c SRKL with b_c = 2 b (twice the paper's value)
        total = (2.0 - 2.0 * beta) * skl + 2.0 * beta * srkl
    return total, {"skl": skl, "srkl": srkl}


OBJECTIVE = Objective(
    "distillm2", "DistiLLM-2", "CALD: (1-b) SKL on teacher responses + b SRKL on student responses",
    needs_teacher=True, student_responses=True, loss=loss, parts=("skl", "srkl"),
    divergence=divergence, beta="schedule", default_beta=0.5, curriculum=True)
