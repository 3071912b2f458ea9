"""The run's programs on abstract arrays: the train step and the sampler, lowered and compiled.

No weights are read: every parameter, optimizer moment, batch and cache is a
`jax.ShapeDtypeStruct` carrying the `NamedSharding` the trainer would give the real array.
The shapes and shardings come from the same builders the trainer uses (`models.param_specs`
and `param_shardings`, `models.lora.param_specs`, `train.student.split`, `train.optimizer`,
`train.loop.init_state`, `Trainer.step_config` / `compile_step`, `train.batch.shardings`), so
a change there changes the plan too. The sampler's calls sit in one function, `lower_sampler`.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from distillm2_jax import models, objectives
from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.models import lora
from distillm2_jax.models.config import ModelConfig, from_hf, load_hf_config
from distillm2_jax.train import batch as batch_layout
from distillm2_jax.train import student as student_lib
from distillm2_jax.train.loop import Trainer, init_state, train_state_shardings
from distillm2_jax.train.optimizer import make_optimizer
from distillm2_jax.train.step import StepInputs

# Optimizer schedules do not change any shape; any positive step count gives the same state.
_TOTAL_STEPS = 1000


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract (or real) arrays: the largest shard
    of each leaf (replicated leaves count whole)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * _itemsize(x.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):   # typed PRNG keys: their raw key data
        return math.prod(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape) * 4
    return jnp.dtype(dtype).itemsize


def read_model_config(path: str | None, key: str) -> ModelConfig:
    """The `ModelConfig` of a model folder, from its config.json alone (no weights are read)."""
    if not path:
        raise UserError(f"{key} is not set (a Hugging Face folder with a config.json)")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}={path}: no config.json there (plan reads only each model folder's "
                        f"config.json; point {key}=... at a folder holding one)")
    return from_hf(load_hf_config(folder), where=str(folder / "config.json"))


def abstract_params(cfg: ModelConfig, dtype, mesh) -> dict:
    """The params dict of `cfg` as sharded abstract arrays (as `hf.load` places them)."""
    shardings = models.param_shardings(cfg, mesh)
    return models.decoder.map_specs(
        lambda path, shape, axes: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=_at(shardings, path)),
        models.param_specs(cfg))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _abstract_lora(params: dict, cfg: ModelConfig, lora_cfg, mesh) -> dict:
    """`params` with the LoRA leaves `train.student.add_lora` adds (float32, by logical axes)."""
    if not lora_cfg.enabled:
        return params
    specs = lora.param_specs(cfg, lora_cfg.rank, tuple(lora_cfg.targets))
    new = {name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shd.named_sharding(axes, shape, mesh))
           for name, (shape, axes) in specs.items()}
    return {**params, "layers": {**params["layers"], **new}}


class _AbstractTrainer(Trainer):
    """A `Trainer` holding abstract arrays: its own `step_config` and `compile_step` build the
    step exactly as a run does, without loading anything."""

    def __init__(self, cfg, mesh, student_cfg, teacher_cfg, frozen, teacher_params):  # noqa: D107
        self.cfg, self.mesh = cfg, mesh
        self.objective = objectives.get(cfg.objective.name)
        self.needs_teacher = self.objective.needs_teacher
        self.student = SimpleNamespace(config=student_cfg)
        self.teacher = None if teacher_cfg is None else SimpleNamespace(config=teacher_cfg)
        self.frozen, self.teacher_params = frozen, teacher_params


@dataclasses.dataclass
class RunParts:
    """The abstract pieces of one run on one mesh."""
    cfg: object
    mesh: object
    student_cfg: ModelConfig
    teacher_cfg: ModelConfig | None    # None: no teacher is loaded
    student_params: dict               # base weights (generation)
    trainable: dict
    frozen: dict
    teacher_params: dict | None        # the teacher's weights (loaded for the step or generation)
    step_teacher: dict | None          # what the step receives (None unless the objective needs it)


def run_parts(cfg, mesh) -> RunParts:
    """Abstract student (with LoRA), teacher and the step's split, as `Trainer.__init__` makes them.

    The logits vocabulary is the smaller head (the trainer uses the tokenizer's size, which is at
    most that; a few rows more or less do not change the plan).
    """
    ways = shd.batch_size_divisor(mesh)
    if cfg.train.micro_batch_size % ways:
        raise UserError(f"train.micro_batch={cfg.train.micro_batch_size} must be a multiple of the "
                        f"{ways} data-parallel ways of mesh.shape={list(cfg.mesh.shape)} (data x fsdp)")
    objective = objectives.get(cfg.objective.name)
    d = cfg.data
    load_teacher = objective.needs_teacher or (not d.pairs and not d.teacher_responses)
    student_cfg = read_model_config(cfg.model.student, "model.student")
    teacher_cfg = read_model_config(cfg.model.teacher, "model.teacher") if load_teacher else None
    vocab = min(c.vocab_size for c in (student_cfg, teacher_cfg) if c is not None)
    student_cfg = dataclasses.replace(student_cfg, logits_vocab=vocab)
    teacher_cfg = teacher_cfg and dataclasses.replace(teacher_cfg, logits_vocab=vocab)
    base = abstract_params(student_cfg, cfg.model.student_dtype, mesh)
    trainable, frozen = student_lib.split(_abstract_lora(base, student_cfg, cfg.lora, mesh))
    teacher = None if teacher_cfg is None else abstract_params(teacher_cfg, cfg.model.teacher_dtype, mesh)
    return RunParts(cfg, mesh, student_cfg, teacher_cfg, base, trainable, frozen, teacher,
                    teacher if objective.needs_teacher else None)


@dataclasses.dataclass
class TrainProgram:
    compiled: object
    state: object        # abstract TrainState (trainable + optimizer state + step)
    batch_bytes: int     # per device: the batch arrays the step reads


def lower_train_step(parts: RunParts) -> TrainProgram:
    """The compiled train step of `parts` (`Trainer.compile_step` on abstract arrays)."""
    cfg, mesh = parts.cfg, parts.mesh
    tx, _ = make_optimizer(cfg.optim, _TOTAL_STEPS)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         jax.eval_shape(lambda t: init_state(t, tx), parts.trainable),
                         train_state_shardings(parts.trainable, tx))
    trainer = _AbstractTrainer(cfg, mesh, parts.student_cfg, parts.teacher_cfg if parts.step_teacher else None,
                               parts.frozen, parts.step_teacher)
    num_micro = cfg.train.grad_accum
    step = trainer.compile_step(tx, jax.tree.map(lambda x: x.sharding, state), num_micro)
    batch = abstract_batch(cfg, mesh)
    replicated = NamedSharding(mesh, P())
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
    logps = None
    if trainer.step_config().curriculum:
        logps = scalar(jnp.float32, (num_micro, 2 * (cfg.train.global_batch // num_micro)))
    inputs = StepInputs(scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.uint32, (2,)), scalar(jnp.bool_), logps)
    compiled = step.lower(state, parts.frozen, parts.step_teacher, batch, inputs).compile()
    return TrainProgram(compiled, state, shard_bytes(batch))


def abstract_batch(cfg, mesh) -> batch_layout.Batch:
    """The largest batch a step sees: global_batch pairs of max_prompt_length prompt tokens and
    two responses of max_length - max_prompt_length tokens (`data.batches.collate_shared_prompts`)."""
    g, p = cfg.train.global_batch, cfg.data.max_prompt_length
    r = cfg.data.max_length - p
    shapes = batch_layout.Batch((g, p), (g, p), (g, 2, r), (g, 2, r), (g, 2, r))
    return batch_layout.Batch(*(jax.ShapeDtypeStruct(s, jnp.int32, sharding=sh)
                                for s, sh in zip(shapes, batch_layout.shardings(mesh))))


@dataclasses.dataclass
class SamplerPrograms:
    prefill: object           # compiled: one group of `rows` prompts into the slots
    decode: object            # compiled: decode steps over all slots (a while loop; one step = its body)
    rows: int                 # slots (rows decoding together, all devices)
    prompt_length: int
    max_new_tokens: int
    kv_cache_bytes: int       # per device
    state_bytes: int          # per device: the whole decode state (cache, tokens, keys, ...)


def lower_sampler(params: dict, cfg: ModelConfig, mesh, generation, *, prompt_length: int,
                  compute_dtype: str) -> SamplerPrograms:
    """The sampler's compiled programs for one model, as `generation.slots.run_slots` calls
    them when every slot is filled at once, on abstract arrays.

    This is the only function that touches the sampler: `sampling.decode.empty_state`,
    `insert` (the prefill of `rows` prompts) and `decode`, each `.lower(...)`-ed (and the first
    two compiled or evaluated for their output shapes), and the `DecodeState` they pass, whose
    `.cache.k` / `.cache.v` (the KV cache) are counted.
    """
    from distillm2_jax.generation.sampler import bucket_length, rows_per_batch
    from distillm2_jax.sampling.decode import SamplingConfig, decode, empty_state, insert, stop_id_array

    mesh = None if mesh.size == 1 else mesh
    rows, length, new = rows_per_batch(generation.batch_size, mesh), bucket_length(prompt_length), generation.max_new_tokens

    def put(shape, dtype, axes=None):
        sharding = None
        if mesh is not None:
            sharding = shd.named_sharding(axes, shape, mesh) if axes else NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    static = dict(sampling=SamplingConfig(generation.temperature, generation.top_k, generation.top_p),
                  pad_id=0, compute_dtype=jnp.dtype(compute_dtype).name, mesh=mesh)
    empty = empty_state.lower(cfg, slots=rows, cache_length=length + new, max_new_tokens=new, pad_id=0,
                              compute_dtype=static["compute_dtype"], record_logits=False, mesh=mesh)
    shardings = empty.compile().output_shardings
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh if mesh else None),
                         empty.out_info, shardings)
    key = jax.eval_shape(lambda: jax.random.key(0))
    stops = put(stop_id_array(()).shape, jnp.int32)
    batch = lambda *shape_dtype: put(*shape_dtype, ("batch", "length")[:len(shape_dtype[0])])  # noqa: E731
    prefill = insert.lower(params, cfg, state, batch((rows, length), jnp.int32), batch((rows, length), jnp.bool_),
                           batch((rows,), jnp.int32), put(key.shape, key.dtype), batch((rows,), jnp.uint32),
                           batch((rows,), jnp.int32), stops, **static).compile()
    steps = decode.lower(params, cfg, state, stops, put((), jnp.int32), put((), jnp.int32), **static).compile()
    return SamplerPrograms(prefill, steps, rows, length, new, shard_bytes((state.cache.k, state.cache.v)),
                           shard_bytes(state))
