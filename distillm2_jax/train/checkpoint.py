"""Orbax checkpoints of a run: train state + JSON metadata (epoch, curriculum, data iterator).

Orbax writes each step into a temporary folder and renames it when complete, so a save that
is killed midway never replaces the last good checkpoint; `latest()` only sees finished ones.
Restoring takes abstract targets with shardings, so a run restores onto any mesh shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keep the last `keep` checkpoints of a run in `directory` (async saves by default)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
        """Start saving (returns before the write finishes unless wait=True)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: latest) placed like `target`'s shardings.

        `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s with `sharding` set.
        """
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
