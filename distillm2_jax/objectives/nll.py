"""Negative log-likelihood of the given (chosen) responses: SeqKD when they are the teacher's
samples, SFT when they are the dataset's. Needs no teacher logits."""
from __future__ import annotations

from distillm2_jax.objectives.base import Objective, Reduction


def loss(r: Reduction, sums: dict, beta, normalization: str):
    nll = r.mean(-sums["lq_label"], "tgo")
    return nll, {"nll": nll}


SEQKD = Objective("seqkd", "SeqKD", "NLL of the teacher's responses", needs_teacher=False,
                  student_responses=False, loss=loss, parts=("nll",))
SFT = Objective("sft", "SFT", "NLL of the given (chosen) responses", needs_teacher=False,
                student_responses=False, loss=loss, parts=("nll",))
