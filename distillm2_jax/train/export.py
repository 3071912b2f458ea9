"""Export a run's student (LoRA merged) from its latest checkpoint to a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from distillm2_jax import config as config_lib
from distillm2_jax import models
from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.train.checkpoint import Checkpointer
from distillm2_jax.train.optimizer import make_optimizer
from distillm2_jax.train.step import TrainState, combine


def restore_student(run_dir: str | Path, *, step: int | None = None, mesh=None) -> models.Decoder:
    """The student of `run_dir` at `step` (default: latest checkpoint), LoRA merged."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: no config.yaml (not a distillm2 run folder)")
    cfg = config_lib.load(cfg_path)
    mesh = mesh or shd.make_mesh(None)
    base = models.from_pretrained(cfg.model.student, dtype=getattr(jnp, cfg.model.student_dtype), mesh=mesh)
    params = base.params()
    frozen: dict = {}
    if cfg.lora.enabled:
        from distillm2_jax.models import lora
        params = lora.add(params, base.config, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                          targets=tuple(cfg.lora.targets), key=jax.random.key(cfg.seed), mesh=mesh)
        params, frozen = lora.split(params)
    tx, _ = make_optimizer(cfg.optim, total_steps=1)
    target = jax.eval_shape(lambda t: TrainState(step=jnp.zeros((), jnp.int32), trainable=t, opt_state=tx.init(t)),
                            params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", replicated), params)
    target = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        trainable=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target.trainable, shardings),
        opt_state=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), target.opt_state))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        if ckpt.latest() is None:
            raise UserError(f"{run_dir / 'checkpoints'}: no complete checkpoint to export")
        state, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    params = combine(state.trainable, frozen)
    if cfg.lora.enabled:
        from distillm2_jax.models import lora
        params = lora.merge(params)
    return models.Decoder(base.config, params, hf_config=base.hf_config)


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype=None) -> Path:
    """Write the run's student as an HF folder with the tokenizer; returns the folder."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(run_dir / "config.yaml")
    student = restore_student(run_dir, step=step)
    return models.save_pretrained(student, out_dir, tokenizer=cfg.model.tokenizer or cfg.model.teacher,
                                  dtype=dtype)
