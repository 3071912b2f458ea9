"""GKD (Agarwal et al.): TRL's generalised JSD with weight beta on teacher and student responses."""
from __future__ import annotations

from distillm2_jax.objectives import divergences
from distillm2_jax.objectives.base import Objective, Reduction, Rows


def divergence(lp, lq, rows: Rows):
    return divergences.generalized_jsd(lp, lq, rows.beta)


def loss(r: Reduction, sums: dict, beta, normalization: str):
    div = sums["div"]
    total = r.mean(div, "all")
    return total, {"jsd": total, "jsd_tgo": r.mean(div, "tgo"), "jsd_sgo": r.mean(div, "sgo")}


OBJECTIVE = Objective(
    "gkd", "GKD", "generalised JSD on teacher and student responses", needs_teacher=True,
    student_responses=True, loss=loss, parts=("jsd", "jsd_tgo", "jsd_sgo"), divergence=divergence,
    beta="gkd_beta", default_beta=0.9)
