"""Export a run's student (LoRA merged) from its latest checkpoint to a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import jax

from distillm2_jax import config as config_lib
from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.hf.save import save_pretrained
from distillm2_jax.models.decoder import Decoder
from distillm2_jax.train import student as student_lib
from distillm2_jax.train.checkpoint import Checkpointer
from distillm2_jax.train.loop import init_state
from distillm2_jax.train.optimizer import make_optimizer
from distillm2_jax.train.step import TrainState


def restore_student(run_dir: str | Path, *, step: int | None = None, mesh=None) -> Decoder:
    """The student of `run_dir` at `step` (default: latest checkpoint), LoRA merged."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: no config.yaml (not a distillm2 run folder)")
    cfg = config_lib.load(cfg_path)
    mesh = mesh or shd.make_mesh(None)
    student = student_lib.load(cfg, mesh)
    tx, _ = make_optimizer(cfg.optim, total_steps=1)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        if ckpt.latest() is None:
            raise UserError(f"{run_dir / 'checkpoints'}: no complete checkpoint to export")
        state, _ = ckpt.restore(step, _restore_target(student.trainable, tx, mesh))
    finally:
        ckpt.close()
    return student.merged(state.trainable)


def _restore_target(trainable, tx, mesh) -> TrainState:
    """Abstract `init_state`: the trainable leaves placed like the freshly loaded ones, the step
    and optimizer state replicated (export reads only the trainable leaves)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(lambda t: init_state(t, tx), trainable)

    def like(shape, array=None):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=getattr(array, "sharding", replicated))

    return TrainState(step=like(shapes.step), trainable=jax.tree.map(like, shapes.trainable, trainable),
                      opt_state=jax.tree.map(like, shapes.opt_state))


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype=None) -> Path:
    """Write the run's student as an HF folder with the tokenizer; returns the folder."""
    run_dir = Path(run_dir)
    cfg = config_lib.load(run_dir / "config.yaml")
    # Export only gathers one tensor at a time, so the student is spread over every device
    # (fsdp): on the default data-parallel mesh each device would hold a whole copy of it.
    student = restore_student(run_dir, step=step, mesh=export_mesh())
    return save_pretrained(student, out_dir, tokenizer=cfg.tokenizer_path, dtype=dtype)


def export_mesh():
    """The mesh export restores the student on: all devices on the fsdp axis, so the weights
    are split across devices (not replicated on each as on the default data-parallel mesh)."""
    return shd.make_mesh((1, -1, 1))
