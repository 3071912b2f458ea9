"""Algorithm 1 of DistiLLM-2 as one run: for each epoch, (re)generate responses, measure the
curriculum reference m (from epoch 2), and train with the b schedule; checkpoint and resume.

Resume is exact: a checkpoint holds the train state (student or LoRA params, optimizer state,
step) and JSON metadata (epoch, batch within the epoch, m, the data iterator's state), and every
random choice is a function of (seed, step) or (seed, epoch, row), so a run killed at any point
and restarted with the same command continues the same trajectory.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from distillm2_jax import config as config_lib
from distillm2_jax import distributed, models, objectives
from distillm2_jax import sharding as shd
from distillm2_jax.objectives import curriculum
from distillm2_jax.data.tokenizer import load_tokenizer
from distillm2_jax.errors import UserError
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.train import batch as batch_layout
from distillm2_jax.train import epoch_data
from distillm2_jax.train import student as student_lib
from distillm2_jax.train.checkpoint import Checkpointer
from distillm2_jax.train.metrics import MetricsWriter, flops_per_token, mfu, peak_flops
from distillm2_jax.train.optimizer import make_optimizer
from distillm2_jax.train.step import (StepConfig, StepInputs, TrainState, measure_gaps,
                                      teacher_sequence_logprobs, train_step)



class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    """What a finished (or preempted) run reports back to a Python caller."""
    run_dir: Path
    steps: int
    epochs_completed: int
    preempted: bool
    final_metrics: dict
    history: list[dict]


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints after the current step and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: preemption handling is the caller's
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Holds the models, mesh, compiled steps and checkpointer of one run."""

    def __init__(self, cfg, *, log=print):
        cfg.validate_paths()
        self.cfg = cfg
        self.log = log if distributed.is_main_process() else (lambda *a, **k: None)
        self.run_dir = Path(cfg.run_dir)
        self.mesh = shd.make_mesh(tuple(cfg.mesh.shape))
        ways = shd.batch_size_divisor(self.mesh)
        if cfg.train.micro_batch_size % ways:
            raise UserError(f"train.micro_batch={cfg.train.micro_batch_size} must be a multiple of the "
                            f"{ways} data-parallel ways of mesh.shape={list(cfg.mesh.shape)} (data x fsdp)")
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        obj = cfg.objective
        self.objective = objectives.get(obj.name)
        self.needs_teacher = self.objective.needs_teacher
        # The student's trainable/frozen split; `student` is its base model (generation, configs).
        self.student_parts = student_lib.load(cfg, self.mesh)
        self.student = self.student_parts.model
        self.frozen = self.student_parts.frozen
        self.trainable0 = self.student_parts.trainable
        self.teacher = None
        self.teacher_params = None
        vocab = len(self.tokenizer)
        if self.objective.reference:   # dpo / ipo: the teacher's slot holds the frozen reference
            self.teacher, self.teacher_params = self._reference()
            models.align_vocab(vocab, self.teacher, self.student)
        elif self.needs_teacher or self._must_generate_teacher():
            self.teacher = from_pretrained(cfg.model.teacher, dtype=getattr(jnp, cfg.model.teacher_dtype),
                                           mesh=self.mesh)
            models.align_vocab(vocab, self.teacher, self.student)
        else:
            models.align_vocab(vocab, self.student)
        if self.teacher_params is None and self.teacher is not None and self.needs_teacher:
            self.teacher_params = self.teacher.params()

    # ------------------------------------------------------------------ setup helpers
    def _reference(self):
        """(model, params) of the frozen reference of dpo / ipo, for the teacher's slot.

        `model.reference`, else the starting student. With LoRA the starting student is the base
        weights the step already holds in `frozen` (the forward applies no adapter there), so
        the reference costs no memory; otherwise the folder is loaded (again) in
        `model.student_dtype`: the train state's copy of the student changes and is donated. A
        starting-student copy gets the student's frozen leaves too (QAT's fake-quant markers).
        """
        m = self.cfg.model
        if m.teacher:
            self.log(f"objective {self.cfg.objective.name}: model.teacher is not used "
                     f"(the frozen reference is model.reference, else the starting student)")
        if m.reference is None and self.student_parts.has_lora:
            self.log(f"reference: the starting student {m.student} (its frozen base weights; LoRA trains)")
            return self.student, self.frozen
        path = m.reference or m.student
        self.log(f"reference: {path} ({m.student_dtype}, frozen)")
        model = from_pretrained(path, dtype=getattr(jnp, m.student_dtype), mesh=self.mesh)
        params = model.params()
        if m.reference is None:   # the starting student as the policy's forward sees it (QAT: quantized)
            params = student_lib.combine(params, self.frozen)
        return model, params

    def _must_generate_teacher(self) -> bool:
        d = self.cfg.data
        return not d.pairs and not d.teacher_responses

    def step_config(self) -> StepConfig:
        c, obj = self.cfg, self.cfg.objective
        return StepConfig(
            student=self.student.config,
            teacher=self.teacher.config if self.teacher_params is not None else None,
            objective=obj.name, alpha=obj.alpha, alpha_min=obj.alpha_min,
            curriculum=obj.curriculum and self.objective.curriculum, skew_stopgrad=obj.skew_stopgrad, reduction=obj.reduction,
            normalization=obj.normalization, chunk_size=obj.chunk_size,
            compute_dtype=c.model.compute_dtype, remat=c.model.remat,
            lora_dropout=c.lora.dropout if c.lora.enabled else 0.0,
            objective_options=tuple((k, getattr(obj, k)) for k in self.objective.options))

    def objective_beta(self, step: int, total_steps: int, epoch: int, steps_per_epoch: int) -> float:
        obj, source = self.cfg.objective, self.objective.beta
        if source == "none":
            return 0.0
        if source != "schedule":
            return float(getattr(obj, source))      # a fixed config key, e.g. objective.gkd_beta
        return float(curriculum.b_schedule(
            obj.beta_schedule, step=step, total_steps=total_steps, epoch=epoch,
            num_epochs=self.cfg.train.epochs, steps_per_epoch=steps_per_epoch, b0=obj.beta))

    def current_student(self, state: TrainState):
        """The student as trained so far, for regenerating responses: (params, config, compute
        dtype) with the live weights (LoRA unmerged: no second copy while sampling)."""
        return self.student_parts.for_sampling(state.trainable, compute_dtype=self.cfg.model.compute_dtype)

    # ------------------------------------------------------------------ compiled functions
    def compile_step(self, tx, state_shardings, num_micro: int):
        cfg = self.step_config()
        mesh = self.mesh

        def step(state, frozen, teacher, batch, inputs):
            return train_step(state, frozen, teacher, batch_layout.micro_batches(batch, num_micro, mesh), inputs, cfg=cfg, tx=tx)

        replicated = NamedSharding(mesh, P())
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        teacher_sh = jax.tree.map(lambda x: x.sharding, self.teacher_params)
        batch_sh = batch_layout.shardings(mesh)
        return jax.jit(step, in_shardings=(state_shardings, frozen_sh, teacher_sh, batch_sh, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def compile_measure(self, num_micro: int):
        """(teacher_logprobs(teacher, batch) -> [A, 2b], measure(stats, trainable, frozen, batch,
        teacher_logp_seq) -> stats): the curriculum's two forward-only passes."""
        cfg = self.step_config()
        mesh = self.mesh
        replicated = NamedSharding(mesh, P())
        batch_sh = batch_layout.shardings(mesh)

        def teacher_logprobs(teacher, batch):
            return teacher_sequence_logprobs(teacher, batch_layout.micro_batches(batch, num_micro, mesh), cfg=cfg)

        def measure(stats, trainable, frozen, batch, teacher_logp_seq):
            return measure_gaps(stats, student_lib.combine(trainable, frozen), None,
                                batch_layout.micro_batches(batch, num_micro, mesh), cfg=cfg, teacher_logp_seq=teacher_logp_seq)
        return (jax.jit(teacher_logprobs, in_shardings=(None, batch_sh), out_shardings=replicated),
                jax.jit(measure, in_shardings=(replicated, None, None, batch_sh, replicated),
                        out_shardings=replicated))

    # ------------------------------------------------------------------ the run
    def run(self, *, max_steps: int | None = None) -> RunResult:
        """Run (or resume) Algorithm 1; `max_steps` stops early (for tests and smoke runs)."""
        cfg = self.cfg
        tcfg = cfg.train
        num_micro = tcfg.grad_accum
        data = epoch_data.EpochData(cfg, self.tokenizer, mesh=self.mesh, log=self.log)
        first_pairs = data.pairs_for_epoch(0, teacher=self.teacher, student=self.student)
        steps_per_epoch = len(first_pairs) // tcfg.global_batch
        if tcfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
        if steps_per_epoch < 1:
            raise UserError(f"train.global_batch={tcfg.global_batch} is larger than the {len(first_pairs)} "
                            f"training pairs: no step fits in an epoch")
        total_steps = steps_per_epoch * tcfg.epochs
        tx, lr_schedule = make_optimizer(cfg.optim, total_steps)

        state = jax.jit(lambda t: init_state(t, tx), out_shardings=train_state_shardings(self.trainable0, tx))(
            self.trainable0)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        ckpt = Checkpointer(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
        meta: dict[str, Any] = {"epoch": 0, "batch": 0, "ref_gap": None, "iterator": None,
                                "steps_per_epoch": steps_per_epoch}
        if ckpt.latest() is not None:
            state, meta = ckpt.restore(None, state)
            self.log(f"resumed from {ckpt.directory}/{ckpt.latest()} (epoch {meta['epoch'] + 1}, "
                     f"batch {meta['batch']})")
            if meta["steps_per_epoch"] != steps_per_epoch:
                raise UserError(f"{ckpt.directory}: checkpoint was made with {meta['steps_per_epoch']} steps per "
                                f"epoch, this config gives {steps_per_epoch}; use a new run_dir")

        lora_rank = cfg.lora.rank if cfg.lora.enabled else 0
        flops_tok = flops_per_token(self.student.config, cfg.data.max_length, lora_rank=lora_rank,
                                    lora_targets=tuple(cfg.lora.targets))
        if self.teacher_params is not None:
            flops_tok += flops_per_token(self.teacher.config, cfg.data.max_length, trainable=False)
        peak = peak_flops(self.mesh.devices.flat)

        if distributed.is_main_process():
            _record_config(cfg, self.run_dir / "config.yaml")

        writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard)
        history: list[dict] = []
        step_fn = None
        preempted = False
        # The step's teacher_logp_seq input while the curriculum is off (one program for all epochs).
        no_teacher_logps = None
        if self.step_config().curriculum:
            no_teacher_logps = jnp.zeros((num_micro, 2 * (tcfg.global_batch // num_micro)), jnp.float32)
        last_saved = int(state.step)
        with _Preemption() as preemption, writer:
            for epoch in range(meta["epoch"], tcfg.epochs):
                resuming = epoch == meta["epoch"] and meta["batch"] > 0
                pairs = first_pairs if epoch == 0 else data.pairs_for_epoch(
                    epoch, teacher=self.teacher, student=self.current_student(state))
                loader = epoch_data.make_loader(cfg, pairs, self.tokenizer, epoch)
                curriculum_on = epoch > 0 and self.step_config().curriculum
                ref_gap, teacher_logps = 0.0, None
                if curriculum_on:
                    ref_gap, teacher_logps = self._epoch_curriculum(
                        state, loader, meta if resuming else None, steps_per_epoch, num_micro)
                    self.log(f"epoch {epoch + 1}: curriculum on, reference gap m = {ref_gap:.5f}")
                iterator = loader.iterator(meta["iterator"] if resuming else None)
                start = meta["batch"] if resuming else 0
                if step_fn is None:
                    step_fn = self.compile_step(tx, state_shardings, num_micro)
                progress = _progress(cfg, epoch, start, steps_per_epoch)
                for b in range(start, steps_per_epoch):
                    t0 = time.perf_counter()
                    batch = batch_layout.to_global(next(iterator), self.mesh)
                    step = int(state.step)
                    beta = self.objective_beta(step, total_steps, epoch, steps_per_epoch)
                    inputs = StepInputs(jnp.float32(beta), jnp.float32(ref_gap),
                                        jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), step)),
                                        jnp.bool_(curriculum_on),
                                        teacher_logps[b] if curriculum_on else no_teacher_logps)
                    state, metrics = step_fn(state, self.frozen, self.teacher_params, batch, inputs)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(metrics["loss"]):
                        ckpt.wait()
                        raise TrainingDiverged(
                            f"loss is {metrics['loss']} at step {step + 1} (epoch {epoch + 1}, batch {b + 1}); "
                            f"stopped without saving. Last good checkpoint: step {ckpt.latest()} in {ckpt.directory}")
                    dt = time.perf_counter() - t0
                    metrics.update(step=step + 1, epoch=epoch + 1, beta=beta, ref_gap=ref_gap,
                                   lr=float(lr_schedule(step)), tokens_per_s=metrics["tokens"] / dt, step_time_s=dt,
                                   mfu=mfu(metrics["tokens"] / dt, flops_tok, peak))
                    history.append(metrics)
                    if (step + 1) % tcfg.log_every == 0 or b == steps_per_epoch - 1:
                        writer.log(step + 1, metrics)
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    meta = {"epoch": epoch, "batch": b + 1, "ref_gap": ref_gap if curriculum_on else None,
                            "iterator": iterator.get_state(), "steps_per_epoch": steps_per_epoch}
                    if max_steps is not None and step + 1 >= max_steps:
                        preemption.requested = True
                    if preemption.requested or (step + 1) % cfg.checkpoint.every_steps == 0:
                        ckpt.save(step + 1, state, meta, wait=preemption.requested)
                        last_saved = step + 1
                    if preemption.requested:
                        break
                progress.close()
                if preemption.requested:
                    preempted = max_steps is None or int(state.step) < max_steps
                    break
                # meta still says (epoch, batch=steps_per_epoch): a resume goes straight to the next epoch
                if int(state.step) != last_saved:
                    ckpt.save(int(state.step), state, meta)
                    last_saved = int(state.step)
            ckpt.close()
        self.state = state
        epochs_done = meta["epoch"] + (1 if meta["batch"] >= steps_per_epoch else 0)
        return RunResult(self.run_dir, int(state.step), epochs_done, preempted,
                         history[-1] if history else {}, history)

    def _epoch_curriculum(self, state, loader, resume_meta: dict | None, steps_per_epoch: int,
                          num_micro: int) -> tuple[float, list]:
        """(m, the teacher's per-sequence log-probs of each batch) for an epoch with the curriculum on.

        One pass over the epoch's batches, in training order, runs the frozen teacher once per
        batch (`teacher_sequence_logprobs`, kept for the steps: the step's gap pass then runs the
        student's head only) and the current student (the gaps whose mean is m). Resuming with m
        saved, only the remaining batches' teacher values are recomputed, by the same program, so
        the resumed steps see the values an uninterrupted run saw.
        """
        if not hasattr(self, "_measure_fns"):
            self._measure_fns = self.compile_measure(num_micro)
        teacher_fn, measure_fn = self._measure_fns
        teacher_logps: list = [None] * steps_per_epoch
        if resume_meta is not None and resume_meta.get("ref_gap") is not None:
            iterator = loader.iterator(resume_meta["iterator"])
            for b in range(resume_meta["batch"], steps_per_epoch):
                teacher_logps[b] = teacher_fn(self.teacher_params, batch_layout.to_global(next(iterator), self.mesh))
            return float(resume_meta["ref_gap"]), teacher_logps
        replicated = NamedSharding(self.mesh, P())
        stats = jax.tree.map(lambda x: shd.put_global(x, replicated), curriculum.init_gap_stats())
        iterator = loader.iterator()
        for b in range(steps_per_epoch):
            batch = batch_layout.to_global(next(iterator), self.mesh)
            teacher_logps[b] = teacher_fn(self.teacher_params, batch)
            stats = measure_fn(stats, state.trainable, self.frozen, batch, teacher_logps[b])
        return float(curriculum.reference_gap(stats)), teacher_logps


def init_state(trainable, tx) -> TrainState:
    """A run's train state at step 0: what its checkpoints hold (export restores into this shape)."""
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))


def train_state_shardings(trainable, tx):
    """Shardings of `init_state(trainable, tx)`: each optimizer moment like its parameter (the
    leaf whose path its own path ends with), the rest replicated. Without them XLA replicates
    the moments on every device, fsdp or not (`zeros_like` carries no sharding)."""
    def keys(path):
        return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)

    leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
    mesh = leaves[0][1].sharding.mesh
    by_path = {keys(path): (x.shape, x.sharding) for path, x in leaves}

    def pick(path, leaf):
        k = keys(path)
        for n in range(len(k)):
            shape, sharding = by_path.get(k[n:], (None, None))
            if shape == leaf.shape:
                return sharding
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(lambda t: init_state(t, tx), trainable))


def _record_config(cfg, path: Path) -> None:
    """Write the run's config; a resumed run must use the same one (except for run-local keys)."""

    if path.is_file():
        previous = config_lib.load(path, require=False)
        keep = ("logging", "checkpoint", "distributed")
        old = {k: v for k, v in previous.model_dump().items() if k not in keep}
        new = {k: v for k, v in cfg.model_dump().items() if k not in keep}
        changed = sorted(k for k in new if new[k] != old.get(k))
        if changed and changed != ["mesh"]:
            raise UserError(f"{path}: this run folder was made with a different config "
                            f"(sections {', '.join(changed)} differ); use a new run_dir")
    config_lib.dump(cfg, path)


def _progress(cfg, epoch, start, total):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                disable=not (cfg.logging.progress and distributed.is_main_process()), leave=True)


def train(cfg, *, max_steps: int | None = None, log=print) -> RunResult:
    """Run or resume the distillation described by `cfg` (a `distillm2_jax.config.Config`)."""
    return Trainer(cfg, log=log).run(max_steps=max_steps)
