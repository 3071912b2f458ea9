"""The distillation train step: one `jax.jit` with explicit shardings and a donated state.

Inside one step: for each micro-batch (a `lax.scan`, i.e. gradient accumulation), the teacher
forward under stop-gradient, the student forward (both `decoder.forward_pairs`: a pair's prompt
runs once, its two responses attend to it), the per-row skew `alpha` from the curriculum
(when on), and the chunked objective from hidden states and output heads (no [2B, T, V] array);
then the optax update. Schedules (b, the curriculum reference m) are traced scalar inputs, so
changing them never recompiles, and whether the curriculum is on is a traced flag under
`lax.cond` (one program; epoch 1 does not pay for the curriculum's extra head pass). The
curriculum's gaps need the teacher's per-sequence log-probs, which are fixed within an epoch:
the trainer passes them in (`teacher_sequence_logprobs`, run at the epoch start), so the extra
pass runs the student's head only. For DPO / IPO the teacher's slot holds the frozen reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from distillm2_jax import objectives
from distillm2_jax.objectives import curriculum
from distillm2_jax.models import decoder, moe
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.train.batch import Batch, loss_hidden, loss_labels
from distillm2_jax.train.student import forward_params

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; checkpointed whole. `trainable` is the student (or its LoRA)."""
    step: jax.Array          # [] int32, optimizer steps taken
    trainable: Params
    opt_state: optax.OptState


def pair_hidden(params: Params, cfg: ModelConfig, micro: Batch, *, compute_dtype, remat: str = "none",
                with_aux: bool = False):
    """A model's `loss_hidden` of one micro-batch (prompts run once per pair); with `with_aux`,
    (hidden, the MoE router's load-balancing loss over the real tokens, 0 for a dense model)."""
    out = decoder.forward_pairs(params, cfg, micro.prompt_ids, micro.prompt_mask, micro.response_ids,
                                micro.response_mask, compute_dtype=compute_dtype, remat=remat,
                                router_stats=with_aux)
    hidden = loss_hidden(out[0], out[1])
    if not with_aux:
        return hidden
    return hidden, (jnp.zeros((), jnp.float32) if out[2] is None else moe.load_balancing_loss(out[2]))


class StepInputs(NamedTuple):
    """Traced per-step inputs (changing their values never recompiles)."""
    beta: jax.Array           # [] CALD b (or the objective's beta)
    ref_gap: jax.Array        # [] curriculum reference m
    key: jax.Array            # PRNG key data for LoRA dropout, uint32 [2]
    curriculum_on: jax.Array  # [] bool: per-row a from the curriculum (epoch >= 2) or fixed a0
    # [A, 2b] float32: the frozen teacher's per-sequence mean label log-probs of this batch
    # (`teacher_sequence_logprobs`, in the loss row order (`objectives.terms`) of each micro-batch). They are fixed
    # within an epoch, so the trainer computes them once, at the epoch start, and the curriculum's
    # per-step gap pass runs the student's head only. None: the step computes them itself.
    teacher_logp_seq: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable: part of the compiled program's identity)."""
    student: ModelConfig
    teacher: ModelConfig | None
    objective: str = "distillm2"
    alpha: float = 0.1
    alpha_min: float = 0.01
    curriculum: bool = False      # the a curriculum exists in this run (switched on by StepInputs)
    skew_stopgrad: bool = True
    reduction: str = "sequence"
    normalization: str = "paper"
    chunk_size: int = 128
    compute_dtype: str = "float32"
    remat: str = "none"
    lora_dropout: float = 0.0
    objective_options: tuple = ()   # ((key, value), ...): the objective's static loss options


def _sequence_logprobs(hs, ws, ht, wt, labels, teacher_logp_seq, cfg: StepConfig) -> dict:
    """Per-sequence label log-probs of both models for the curriculum's gaps; with the teacher's
    given (`teacher_logp_seq` [2b]), only the student's head runs."""
    if teacher_logp_seq is None:
        return objectives.chunked_sequence_logprobs(
            hs, ws, ht, wt, labels, chunk_size=cfg.chunk_size, student_softcap=cfg.student.final_softcap,
            teacher_softcap=cfg.teacher.final_softcap)
    seq = objectives.chunked_sequence_logprobs(hs, ws, None, None, labels, chunk_size=cfg.chunk_size,
                                           student_softcap=cfg.student.final_softcap)
    return {**seq, "teacher_logp_seq": teacher_logp_seq}


def micro_loss(trainable: Params, frozen: Params, teacher: Params | None, cfg: StepConfig,
               micro: Batch, inputs: StepInputs, denominators: dict | None = None, num_micro: int = 1):
    """Loss and metrics of one micro-batch (a `Batch` without its leading A axis).

    denominators: the whole step's counts (`objectives.loss_denominators` of `loss_labels`), so
    that the micro-batch losses add up to the loss of the whole batch. A mixture-of-experts
    student adds `router_aux_loss_coef` times its router's load-balancing loss (`models.moe`),
    divided by the `num_micro` micro-batches so that the step adds their mean.
    """
    student = forward_params(trainable, frozen, key=inputs.key, dropout=cfg.lora_dropout)
    dtype = cfg.compute_dtype
    hs, router_aux = pair_hidden(student, cfg.student, micro, compute_dtype=dtype, remat=cfg.remat,
                                 with_aux=True)
    ws = decoder.output_head(student, cfg.student)
    ht = wt = None
    if cfg.teacher is not None:
        teacher = jax.lax.stop_gradient(teacher)
        ht = jax.lax.stop_gradient(pair_hidden(teacher, cfg.teacher, micro, compute_dtype=dtype))
        wt = decoder.output_head(teacher, cfg.teacher)
    labels = loss_labels(micro.labels)
    rows = labels.shape[0]
    num_pairs = rows // 2
    softcaps = dict(student_softcap=cfg.student.final_softcap,
                    teacher_softcap=None if cfg.teacher is None else cfg.teacher.final_softcap)
    alpha = jnp.full((rows,), cfg.alpha, jnp.float32)
    if cfg.curriculum and cfg.teacher is not None:
        def curriculum_alpha():
            seq = _sequence_logprobs(hs, ws, ht, wt, labels, inputs.teacher_logp_seq, cfg)
            a, _ = curriculum.curriculum_alpha(seq, inputs.ref_gap, enabled=True, a0=cfg.alpha, a_min=cfg.alpha_min)
            return jnp.broadcast_to(a, (rows,)).astype(jnp.float32)
        alpha = jax.lax.stop_gradient(jax.lax.cond(inputs.curriculum_on, curriculum_alpha, lambda: alpha))
    loss, metrics = objectives.chunked_objective(
        cfg.objective, hs, ws, ht, wt, labels, num_pairs=num_pairs, chunk_size=cfg.chunk_size,
        alpha=alpha, beta=inputs.beta, skew_stopgrad=cfg.skew_stopgrad, reduction=cfg.reduction,
        normalization=cfg.normalization, denominators=denominators,
        options=dict(cfg.objective_options), **softcaps)
    metrics = {**metrics, "alpha_mean": jnp.mean(alpha), "alpha_min": jnp.min(alpha), "alpha_max": jnp.max(alpha),
               "tokens": jnp.sum(labels != objectives.IGNORE_INDEX)}
    if cfg.student.is_moe:
        loss = loss + cfg.student.router_aux_loss_coef * router_aux / num_micro
        metrics["router_aux_loss"] = router_aux
    return loss, metrics


# Metrics combined over micro-batches by min/max instead of the mean.
_REDUCE = {"alpha_min": jnp.minimum, "alpha_max": jnp.maximum}
_INIT = {"alpha_min": float("inf"), "alpha_max": float("-inf")}


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


def train_step(state: TrainState, frozen: Params, teacher: Params | None, batch: Batch,
               inputs: StepInputs, *, cfg: StepConfig, tx: optax.GradientTransformation):
    """One optimizer step over A micro-batches; returns (new state, scalar metrics).

    Every micro-batch divides by the counts of the whole batch, so the summed gradients are
    those of the batch's loss, however its tokens and empty rows fall across micro-batches.
    Loss metrics (`objectives.ADDITIVE_METRICS`) add up; the others are means over micro-batches.
    """
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    num_micro = batch.labels.shape[0]
    denominators = objectives.loss_denominators(loss_labels(batch.labels), batch.labels.shape[1] // 2,
                                            cfg.reduction)

    def accumulate(carry, xs):
        grads_sum, metrics_sum = carry
        micro, i, teacher_logp_seq = xs
        step_inputs = inputs._replace(key=jax.random.key_data(
            jax.random.fold_in(jax.random.wrap_key_data(inputs.key), i)), teacher_logp_seq=teacher_logp_seq)
        (loss, metrics), grads = grad_fn(state.trainable, frozen, teacher, cfg, micro, step_inputs,
                                         denominators, num_micro)
        metrics = {**_scalar_metrics(metrics), "loss": loss}
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
        metrics_sum = {k: _REDUCE.get(k, jnp.add)(metrics_sum[k], v) for k, v in metrics.items()}
        return (grads_sum, metrics_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
    first_lp = None if inputs.teacher_logp_seq is None else inputs.teacher_logp_seq[0]
    metric_shapes = jax.eval_shape(
        lambda: {**_scalar_metrics(micro_loss(state.trainable, frozen, teacher, cfg,
                                              jax.tree.map(lambda x: x[0], batch),
                                              inputs._replace(teacher_logp_seq=first_lp))[1]),
                 "loss": jnp.float32(0)})
    metric_zeros = {k: jnp.full(v.shape, _INIT.get(k, 0.0), jnp.float32) for k, v in metric_shapes.items()}
    (grads, metrics), _ = jax.lax.scan(
        accumulate, (zeros, metric_zeros), (batch, jnp.arange(num_micro), inputs.teacher_logp_seq))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
    summed = _REDUCE.keys() | objectives.ADDITIVE_METRICS | {"tokens"}
    metrics = {k: v if k in summed else v / num_micro for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    new_state = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def teacher_sequence_logprobs(teacher: Params, batch: Batch, *, cfg: StepConfig) -> jax.Array:
    """The teacher's per-sequence mean label log-probs [A, 2b] of a batch (forward only), in the
    loss row order of each micro-batch: `StepInputs.teacher_logp_seq` for a frozen teacher."""
    def one(_, micro):
        ht = pair_hidden(teacher, cfg.teacher, micro, compute_dtype=cfg.compute_dtype)
        seq = objectives.chunked_sequence_logprobs(
            ht, decoder.output_head(teacher, cfg.teacher), None, None, loss_labels(micro.labels),
            chunk_size=cfg.chunk_size, student_softcap=cfg.teacher.final_softcap)
        return None, seq["student_logp_seq"]

    _, out = jax.lax.scan(one, None, batch)
    return out


def measure_gaps(stats: curriculum.GapStats, student: Params, teacher: Params | None, batch: Batch,
                 *, cfg: StepConfig, teacher_logp_seq: jax.Array | None = None) -> curriculum.GapStats:
    """Add one batch's per-sequence gaps (forward only) to the epoch's running sums.

    teacher_logp_seq: the batch's `teacher_sequence_logprobs` [A, 2b]; then `teacher` is not
    used (may be None) and only the student runs. None: both models run.
    """
    def one(stats, xs):
        micro, lp = xs
        hs = pair_hidden(student, cfg.student, micro, compute_dtype=cfg.compute_dtype)
        ws = decoder.output_head(student, cfg.student)
        ht = wt = None
        if lp is None:
            ht = pair_hidden(teacher, cfg.teacher, micro, compute_dtype=cfg.compute_dtype)
            wt = decoder.output_head(teacher, cfg.teacher)
        seq = _sequence_logprobs(hs, ws, ht, wt, loss_labels(micro.labels), lp, cfg)
        gap = curriculum.sequence_gaps(seq["student_logp_seq"], seq["teacher_logp_seq"], micro.labels.shape[0] // 2)
        return curriculum.update_gap_stats(stats, gap, seq["tokens_seq"]), None

    stats, _ = jax.lax.scan(one, stats, (batch, teacher_logp_seq))
    return stats
