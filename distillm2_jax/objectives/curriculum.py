"""The b (SRKL weight) schedules and the per-sample a (skew) curriculum of DistiLLM-2.

Pure functions of (step, epoch, statistics), usable inside ``jax.jit``; the only state is
``GapStats``, a small pytree (flax.struct.dataclass) that Orbax checkpoints with the train state.

Conventions: ``step`` is the global optimizer step counted from 0; ``epoch`` is counted from 0
(the paper's e = 1 is epoch 0 here); rows [0:B] of a paired batch are TGO, rows [B:2B] SGO.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

B_SCHEDULES = ("constant", "linear", "paper")
_f32 = jnp.float32


# --------------------------------------------------------------------------------------------
# b schedules
# --------------------------------------------------------------------------------------------
def b_constant(b0: float = 0.5) -> jax.Array:
    """b = b0 throughout."""
    return jnp.asarray(b0, _f32)


def b_linear(step, total_steps, *, b0: float = 0.5, b_end: float = 0.75,
             ramp_fraction: float = 0.5) -> jax.Array:
    """Authors' code ramp: b = b0 + (b_end - b0) * min(1, step / (ramp_fraction * total_steps)).

    Defaults reproduce b_c = 1 + 0.5 min(1, 2 step / total) in paper units (b = b_c / 2):
    b goes 0.5 -> 0.75 over the first half of the run, then stays.
    """
    ramp = jnp.maximum(jnp.asarray(ramp_fraction * total_steps, _f32), 1.0)
    frac = jnp.minimum(1.0, jnp.asarray(step, _f32) / ramp)
    return jnp.asarray(b0, _f32) + (b_end - b0) * frac


def b_paper(step, total_steps, epoch, num_epochs, *, steps_per_epoch=None, b0: float = 0.5,
            period: str = "run", first_epoch: int = 0) -> jax.Array:
    """Algorithm 1: b = clip(e / E + tau / T, b0, 1).

    The printed rule leaves two choices open (docs/experiments.md, "The b schedule: readings"):

    * what T is (``period``): "run" (default) takes T = ``total_steps``, so with e from 0,
      e / E + tau / T is exactly the fraction of the run done (b stays at b0 for the first half,
      then rises linearly to 1 at the end, continuous across epochs); "epoch" takes
      T = ``steps_per_epoch`` (b then saw-tooths and reaches 1 inside epochs);
    * where e starts (``first_epoch``): 0 (default) or 1, the paper's "for e = 1..E" taken
      literally (with period "epoch" and E = 3, b reaches 1 two thirds into the first epoch,
      restarts at 2/3 in the second, and is 1 throughout the third).

    e = ``epoch`` + ``first_epoch`` (``epoch`` counted from 0), E = ``num_epochs``, tau =
    iteration within the epoch (``step - epoch * steps_per_epoch``, from 0).
    ``steps_per_epoch`` defaults to ``total_steps // num_epochs``.
    """
    if period not in ("run", "epoch"):
        raise ValueError(f"period={period!r}: choose 'run' or 'epoch'")
    if first_epoch not in (0, 1):
        raise ValueError(f"first_epoch={first_epoch!r}: choose 0 or 1")
    spe = total_steps // num_epochs if steps_per_epoch is None else steps_per_epoch
    tau = jnp.asarray(step, _f32) - jnp.asarray(epoch, _f32) * spe
    t = total_steps if period == "run" else spe
    e = jnp.asarray(epoch, _f32) + first_epoch
    b = e / num_epochs + tau / jnp.maximum(jnp.asarray(t, _f32), 1.0)
    return jnp.clip(b, b0, 1.0)


def b_schedule(name: str, *, step, total_steps, epoch=0, num_epochs: int = 1,
               steps_per_epoch=None, b0: float = 0.5, b_end: float = 0.75,
               ramp_fraction: float = 0.5, paper_period: str = "run",
               paper_first_epoch: int = 0) -> jax.Array:
    """Select a b schedule by name ("constant", "linear", "paper"); returns a float32 scalar.

    paper_period / paper_first_epoch choose the reading of the paper's rule (`b_paper`); the
    trainer uses the defaults (T = the run, e from 0).
    """
    if name == "constant":
        return b_constant(b0)
    if name == "linear":
        return b_linear(step, total_steps, b0=b0, b_end=b_end, ramp_fraction=ramp_fraction)
    if name == "paper":
        return b_paper(step, total_steps, epoch, num_epochs, steps_per_epoch=steps_per_epoch,
                       b0=b0, period=paper_period, first_epoch=paper_first_epoch)
    raise ValueError(f"name={name!r}: unknown b schedule; choose one of {B_SCHEDULES}")


# --------------------------------------------------------------------------------------------
# a curriculum
# --------------------------------------------------------------------------------------------
def sequence_gaps(student_logp_seq: jax.Array, teacher_logp_seq: jax.Array,
                  num_pairs: int) -> jax.Array:
    """Per-sequence gaps [2B] from per-sequence mean token log-probs [2B] (stop-gradient).

    TGO rows: gap_t = exp(mean log p(y_t)) - exp(mean log q(y_t));
    SGO rows: gap_s = exp(mean log q(y_s)) - exp(mean log p(y_s)).
    """
    lq = jax.lax.stop_gradient(jnp.asarray(student_logp_seq, _f32))
    lp = jax.lax.stop_gradient(jnp.asarray(teacher_logp_seq, _f32))
    if lq.shape != (2 * num_pairs,) or lp.shape != lq.shape:
        raise ValueError(f"student_logp_seq/teacher_logp_seq: expected shape [{2 * num_pairs}], "
                         f"got {lq.shape} and {lp.shape}")
    diff = jnp.exp(lp) - jnp.exp(lq)
    sign = jnp.concatenate([jnp.ones((num_pairs,), _f32), -jnp.ones((num_pairs,), _f32)])
    return sign * diff


@flax.struct.dataclass
class GapStats:
    """Running sums of the valid per-sequence gaps over an epoch (float32 scalars)."""
    sum_t: jax.Array
    count_t: jax.Array
    sum_s: jax.Array
    count_s: jax.Array


def init_gap_stats() -> GapStats:
    """Empty accumulator."""
    z = jnp.zeros((), _f32)
    return GapStats(z, z, z, z)


def update_gap_stats(stats: GapStats, gap: jax.Array, tokens_seq: jax.Array) -> GapStats:
    """Add one batch's gaps [2B] (sequences with tokens_seq == 0 are skipped).

    Plain reductions over the batch axis, so under ``jax.jit`` with batch-sharded global arrays
    the sums cover every shard (XLA inserts the all-reduce).
    """
    gap = jnp.asarray(gap, _f32)
    n = gap.shape[0]
    if gap.ndim != 1 or n % 2 or tokens_seq.shape != (n,):
        raise ValueError(f"gap, tokens_seq: expected equal shapes [2B], got {gap.shape} and "
                         f"{tokens_seq.shape}")
    b = n // 2
    valid = tokens_seq > 0
    g = jnp.where(valid, gap, 0.0)
    v = valid.astype(_f32)
    return GapStats(stats.sum_t + jnp.sum(g[:b]), stats.count_t + jnp.sum(v[:b]),
                    stats.sum_s + jnp.sum(g[b:]), stats.count_s + jnp.sum(v[b:]))


def reference_gap(stats: GapStats) -> jax.Array:
    """m: the mean of all accumulated gaps (TGO and SGO pooled); 0 if nothing was added."""
    return (stats.sum_t + stats.sum_s) / jnp.maximum(stats.count_t + stats.count_s, 1.0)


def skew_alpha(gap: jax.Array, m, *, enabled=True, tokens_seq: jax.Array | None = None,
               a0: float = 0.1, a_min: float = 0.01, eps: float = 1e-5
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-row skew a [2B] = clip(1 - (1 - a0) m / (gap + eps), a_min, a0), stop-gradient.

    a == a0 where ``enabled`` is False (pass ``epoch >= 1``: the curriculum is off in the first
    epoch). A gap at the reference (gap == m) gives a0; smaller gaps (easy samples) smaller a;
    larger gaps are clipped to a0. Note the formula as written: a gap below -eps (student beats
    the teacher on that sequence) makes the ratio negative and gives a0.
    Returns (alpha [2B], {"alpha_mean", "alpha_min", "alpha_max"} over rows with tokens).
    """
    gap = jax.lax.stop_gradient(jnp.asarray(gap, _f32))
    m = jax.lax.stop_gradient(jnp.asarray(m, _f32))
    a = jnp.clip(1.0 - (1.0 - a0) * m / (gap + eps), a_min, a0)
    a = jnp.where(jnp.asarray(enabled), a, jnp.asarray(a0, _f32))
    valid = jnp.ones(gap.shape, bool) if tokens_seq is None else tokens_seq > 0
    cnt = jnp.maximum(jnp.sum(valid), 1)
    stats = {
        "alpha_mean": jnp.sum(jnp.where(valid, a, 0.0)) / cnt,
        "alpha_min": jnp.min(jnp.where(valid, a, jnp.inf)),
        "alpha_max": jnp.max(jnp.where(valid, a, -jnp.inf)),
    }
    return a, stats


def curriculum_alpha(seq_logprobs: dict, m, *, enabled=True, a0: float = 0.1,
                     a_min: float = 0.01) -> tuple[jax.Array, dict[str, jax.Array]]:
    """a [2B] for a batch from ``losses.(chunked_)sequence_logprobs`` output (or loss metrics).

    ``seq_logprobs`` holds "student_logp_seq", "teacher_logp_seq", "tokens_seq" ([2B] each).
    """
    lq = seq_logprobs["student_logp_seq"]
    gap = sequence_gaps(lq, seq_logprobs["teacher_logp_seq"], lq.shape[0] // 2)
    return skew_alpha(gap, m, enabled=enabled, tokens_seq=seq_logprobs["tokens_seq"], a0=a0,
                      a_min=a_min)
