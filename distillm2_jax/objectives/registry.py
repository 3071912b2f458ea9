"""One record per objective: which rows it trains on, whether it needs the teacher, which
schedule gives its b and whether the a curriculum applies. The config, the trainer, the
per-epoch data and the experiments ask this registry instead of listing names themselves.

Adding an objective: its loss terms in `distillm2_jax.losses`, one `Objective` here, and its name
in `config.ObjectiveSection.name` (a test keeps the two lists equal).
"""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    needs_teacher: bool                   # False: trains on given responses alone (teacher may be absent)
    student_responses: bool               # the loss reads student-generated rows (Algorithm 1 samples them)
    # where the step's `beta` input comes from: the b schedule (objective.beta_schedule from
    # objective.beta), a fixed config key, or nothing (0)
    beta: Literal["schedule", "gkd_beta", "dpkd_beta", "none"] = "none"
    curriculum: bool = False              # objective.curriculum switches on the per-row a from epoch 2


_ALL = (
    Objective("distillm2", "CALD: (1-b) SKL on teacher responses + b SRKL on student responses",
              needs_teacher=True, student_responses=True, beta="schedule", curriculum=True),
    Objective("distillm", "DistiLLM v1: skew reverse KL on teacher and student responses",
              needs_teacher=True, student_responses=True),
    Objective("kd", "forward KL(p||q) on teacher responses", needs_teacher=True, student_responses=False),
    Objective("rkl", "reverse KL(q||p) on teacher and student responses", needs_teacher=True,
              student_responses=True),
    Objective("seqkd", "NLL of the teacher's responses", needs_teacher=False, student_responses=False),
    Objective("gkd", "generalised JSD on teacher and student responses", needs_teacher=True,
              student_responses=True, beta="gkd_beta"),
    Objective("dpkd", "DPKD: a DPO-style margin between teacher and student responses", needs_teacher=True,
              student_responses=True, beta="dpkd_beta"),
    Objective("sft", "NLL of the given (chosen) responses", needs_teacher=False, student_responses=False),
)
REGISTRY: dict[str, Objective] = {o.name: o for o in _ALL}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Objective:
    """The objective called `name`; ValueError listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}") from None
