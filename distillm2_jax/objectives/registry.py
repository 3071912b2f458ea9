"""The one list of objectives. The config, the trainer, the per-epoch data, evaluation and the
experiments ask it (`get`, `NAMES`) instead of listing names themselves.

Adding an objective: one module in this package defining an `Objective` (see `kd.py` and
docs/adding_an_objective.md) and one line below; the config's `objective.name` accepts the names
listed here.
"""
from __future__ import annotations

from distillm2_jax.objectives import distillm, distillm2, dpkd, dpo, gkd, kd, nll, rkl
from distillm2_jax.objectives.base import Objective

_ALL = (
    distillm2.OBJECTIVE,
    distillm.OBJECTIVE,
    kd.OBJECTIVE,
    rkl.OBJECTIVE,
    nll.SEQKD,
    gkd.OBJECTIVE,
    dpkd.OBJECTIVE,
    nll.SFT,
    dpo.DPO,
    dpo.IPO,
)
REGISTRY: dict[str, Objective] = {o.name: o for o in _ALL}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# Loss metrics that are sums over rows divided by a batch-wide count: with `denominators` spanning
# several micro-batches they add up across them (every other metric is a per-micro-batch mean).
ADDITIVE_METRICS = frozenset({"loss"}.union(*(o.parts for o in _ALL)))


def get(name: str) -> Objective:
    """The objective called `name`; ValueError listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}") from None
