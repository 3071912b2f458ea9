"""Reverse KL(q || p) on the student's own responses (on-policy, mode-seeking)."""
from __future__ import annotations

from distillm2_jax.objectives import divergences
from distillm2_jax.objectives.base import Objective, Reduction, Rows


def divergence(lp, lq, rows: Rows):
    return divergences.reverse_kl(lp, lq)


def loss(r: Reduction, sums: dict, beta, normalization: str):
    rkl = r.mean(sums["div"], "sgo")
    return rkl, {"rkl": rkl}


OBJECTIVE = Objective(
    "rkl", "RKL", "reverse KL(q||p) on student responses", needs_teacher=True, student_responses=True,
    loss=loss, parts=("rkl",), divergence=divergence, trained="sgo")
