"""DistiLLM (v1): skew reverse KL SRKL_a on teacher and student responses alike."""
from __future__ import annotations

from distillm2_jax.objectives import divergences
from distillm2_jax.objectives.base import Objective, Reduction, Rows


def divergence(lp, lq, rows: Rows):
    return divergences.skew_reverse_kl(lp, lq, rows.alpha, rows.skew_stopgrad)


def loss(r: Reduction, sums: dict, beta, normalization: str):
    div = sums["div"]
    total = r.mean(div, "all")
    return total, {"srkl": total, "srkl_tgo": r.mean(div, "tgo"), "srkl_sgo": r.mean(div, "sgo")}


OBJECTIVE = Objective(
    "distillm", "DistiLLM", "DistiLLM v1: skew reverse KL on teacher and student responses",
    needs_teacher=True, student_responses=True, loss=loss, parts=("srkl", "srkl_tgo", "srkl_sgo"),
    divergence=divergence)
