"""DPKD: a DPO-style margin between the teacher's and the student's responses, with the teacher
as the reference model: -log sigmoid(beta ((lq_t - lq_s) - (lp_t - lp_s))) on length-averaged
log-probs, one term per pair whose two responses are both non-empty."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distillm2_jax.objectives.base import Objective, Reduction


def loss(r: Reduction, sums: dict, beta, normalization: str):
    t, s = r.slices["tgo"], r.slices["sgo"]
    lq = sums["lq_label"] / r.denom
    lp = jax.lax.stop_gradient(sums["lp_label"]) / r.denom
    z = beta * ((lq[t] - lq[s]) - (lp[t] - lp[s]))
    vp, npairs = r.pairs()
    total = jnp.sum(jnp.where(vp, -jax.nn.log_sigmoid(z), 0.0)) / npairs
    return total, {"dpkd_margin": jax.lax.stop_gradient(jnp.sum(jnp.where(vp, z, 0.0)) / npairs),
                   "dpkd_accuracy": jnp.sum(vp & (z > 0)) / npairs}


OBJECTIVE = Objective(
    "dpkd", "DPKD", "DPKD: a DPO-style margin between teacher and student responses", needs_teacher=True,
    student_responses=True, loss=loss, parts=("dpkd_margin", "dpkd_accuracy"), beta="dpkd_beta",
    default_beta=0.1, linear=False)
