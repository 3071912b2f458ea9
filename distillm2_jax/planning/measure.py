"""Measure a run config on a mesh: per-device bytes and FLOPs of its compiled programs.

Bytes of parameters, optimizer state, teacher, batch and KV cache are exact: the per-device
shard of each sharded abstract array. Temporaries come from `compiled.memory_analysis()`
(the backend the programs were compiled for: on fake CPU devices they are XLA:CPU's, whose
fusion and buffer reuse differ from XLA:GPU's and XLA:TPU's). FLOPs and bytes accessed are
XLA's cost analysis with loops counted by their trip counts (`planning.costs`).
"""
from __future__ import annotations

import dataclasses

import jax

from distillm2_jax import objectives
from distillm2_jax import sharding as shd
from distillm2_jax.planning import abstract
from distillm2_jax.planning.costs import program_costs


@dataclasses.dataclass
class SamplerPlan:
    """One model's generation programs (per device unless said otherwise)."""
    model: str                  # "teacher" or "student"
    rows: int                   # rows decoding together (all devices)
    prompt_length: int
    max_new_tokens: int
    kv_cache_bytes: int
    state_bytes: int            # the decode state (KV cache, tokens, keys, ...)
    temp_bytes: int             # the larger of the prefill's and a decode step's temporaries
    prefill_flops: float
    prefill_bytes_accessed: float
    decode_step_flops: float    # one decode step over all rows
    decode_step_bytes_accessed: float


@dataclasses.dataclass
class Plan:
    """What one config needs on one mesh, per device (hardware-independent)."""
    devices: int
    mesh_shape: list[int]
    platform: str               # the backend the programs were compiled for ("cpu": fake devices)
    params_bytes: int           # the student: trainable and frozen weights (LoRA adapters included)
    trainable_bytes: int
    optimizer_bytes: int
    teacher_bytes: int          # the teacher's weights (0 when no teacher is loaded)
    batch_bytes: int
    train_temp_bytes: int       # the step's temporaries and non-donated outputs
    step_flops: float           # one optimizer step
    step_bytes_accessed: float
    step_flops_xla_once: float  # XLA's raw figure (loop bodies once), for reference
    tokens_per_step: int        # tokens through the layers per step (all devices, prompts once)
    samplers: list[SamplerPlan]

    @property
    def resident_bytes(self) -> int:
        """What stays on the devices for the whole run: student, optimizer state, teacher."""
        return self.params_bytes + self.optimizer_bytes + self.teacher_bytes

    @property
    def train_bytes(self) -> int:
        return self.resident_bytes + self.batch_bytes + self.train_temp_bytes

    @property
    def generation_bytes(self) -> int:
        extra = max((s.state_bytes + s.temp_bytes for s in self.samplers), default=0)
        return self.resident_bytes + extra if self.samplers else 0

    @property
    def kv_cache_bytes(self) -> int:
        return max((s.kv_cache_bytes for s in self.samplers), default=0)

    @property
    def total_bytes(self) -> int:
        """The peak of the run: the train step or generation, whichever needs more."""
        return max(self.train_bytes, self.generation_bytes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(**{**data, "samplers": [SamplerPlan(**s) for s in data["samplers"]]})


def generating_models(cfg) -> list[str]:
    """Which models Algorithm 1 samples from with this config (`train.epoch_data`)."""
    d, g = cfg.data, cfg.generation
    needs_student = objectives.get(cfg.objective.name).student_responses
    regenerate = g.regenerate_student and needs_student
    out = []
    if not d.teacher_responses and (not d.pairs or regenerate):
        out.append("teacher")
    if needs_student and (not d.pairs or regenerate):
        out.append("student")
    return out


def _temp(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + max(0, m.output_size_in_bytes - m.alias_size_in_bytes))


def measure(cfg, devices: list | None = None, *, generation: bool = True) -> Plan:
    """Lower and compile the run's train step (and sampler programs) on a mesh of `devices`
    (default: all of `jax.devices()`) and measure them."""
    devices = list(devices if devices is not None else jax.devices())
    mesh = shd.make_mesh(tuple(cfg.mesh.shape), devices=devices)
    parts = abstract.run_parts(cfg, mesh)
    train = abstract.lower_train_step(parts)
    costs = program_costs(train.compiled)
    g, p = cfg.train.global_batch, cfg.data.max_prompt_length
    samplers = []
    for which in (generating_models(cfg) if generation else []):
        if which == "teacher":   # the teacher samples in its storage dtype (`Trainer.teacher`)
            params, model_cfg, dtype = parts.teacher_params, parts.teacher_cfg, cfg.model.teacher_dtype
        else:                    # epoch 1 samples the base student in its storage dtype
            params, model_cfg, dtype = parts.student_params, parts.student_cfg, cfg.model.student_dtype
        progs = abstract.lower_sampler(params, model_cfg, mesh, cfg.generation, prompt_length=p,
                                       compute_dtype=dtype)
        pre, dec = program_costs(progs.prefill), program_costs(progs.decode)
        step = next((loop.body for loop in dec.loops if loop.trip_count is None), dec.total)
        samplers.append(SamplerPlan(
            which, progs.rows, progs.prompt_length, progs.max_new_tokens, progs.kv_cache_bytes,
            progs.state_bytes, max(_temp(progs.prefill), _temp(progs.decode)), pre.total["flops"],
            pre.total["bytes accessed"], step["flops"], step["bytes accessed"]))
    return Plan(
        devices=len(devices), mesh_shape=[int(mesh.shape[a]) for a in shd.MESH_AXES],
        platform=devices[0].platform,
        params_bytes=abstract.shard_bytes((parts.trainable, parts.frozen)),
        trainable_bytes=abstract.shard_bytes(parts.trainable),
        optimizer_bytes=abstract.shard_bytes(train.state.opt_state),
        teacher_bytes=abstract.shard_bytes(parts.teacher_params) if parts.teacher_params else 0,
        batch_bytes=train.batch_bytes, train_temp_bytes=_temp(train.compiled),
        step_flops=costs.total["flops"], step_bytes_accessed=costs.total["bytes accessed"],
        step_flops_xla_once=costs.xla_once["flops"],
        tokens_per_step=g * (p + 2 * (cfg.data.max_length - p)), samplers=samplers)
