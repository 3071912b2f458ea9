"""KD: forward KL(p || q) on the teacher's responses only (supervised, word-level KD)."""
from __future__ import annotations

from distillm2_jax.objectives import divergences
from distillm2_jax.objectives.base import Objective, Reduction, Rows


def divergence(lp, lq, rows: Rows):
    return divergences.forward_kl(lp, lq)


def loss(r: Reduction, sums: dict, beta, normalization: str):
    fkl = r.mean(sums["div"], "tgo")
    return fkl, {"fkl": fkl}


OBJECTIVE = Objective(
    "kd", "KD", "forward KL(p||q) on teacher responses", needs_teacher=True, student_responses=False,
    loss=loss, parts=("fkl",), divergence=divergence, trained="tgo")
