"""The typed run configuration: pydantic sections, their checks, and building one from a dict.

Every section rejects unknown keys and checks types strictly (no "3" -> 3, no True -> 1; an
int is accepted where a number is expected), so a typo in a YAML file or an override fails up
front with one line naming the key instead of silently training with a default. Reading files
and applying overrides live in `config.loading`; see docs/config.md for every key.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distillm2_jax import objectives
from distillm2_jax.config.errors import ConfigError, field_annotation, from_validation_error, lookup_source, show

# Kept equal to the names used by models.decoder / losses / curriculum (tests check it);
# spelled out here so reading a config never imports JAX.
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Sources of the values being validated by `from_raw`, so errors can name the file: pydantic
# calls `Config.__init__` (a custom init) from `model_validate` as well.
_SOURCES: ContextVar[Mapping[str, str]] = ContextVar("config_sources", default={})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _fspath(cls, value):
    """Accept pathlib.Path (and other os.PathLike) where a path string is expected."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# The objectives of the registry, so that adding one touches no list here.
ObjectiveName = Literal[objectives.NAMES]


class QuantizationSection(_Section):
    """The student's linear layers in low-bit integers (docs/quantization.md)."""
    mode: Literal["none", "qlora", "qat"] = "none"   # qlora: frozen quantized base + LoRA; qat: fake-quant
    bits: Literal[4, 8] = 4
    group_size: int = Field(128, ge=0)               # input features per scale; 0 = one per output column


class ModelSection(_Section):
    teacher: str | None = None   # HF folder of the teacher (required by `load`, see check_required)
    student: str | None = None   # HF folder of the (SFT'd) student
    tokenizer: str | None = None  # HF folder with the tokenizer; None -> the teacher's
    reference: str | None = None  # dpo/ipo: HF folder of the frozen reference; None -> the starting student
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    student_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    remat: Literal["none", "full", "dots", "dots_saveable"] = "none"
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)

    paths_as_text = field_validator("teacher", "student", "tokenizer", "reference",
                                    mode="before")(classmethod(_fspath))


class MeshSection(_Section):
    shape: list[int] = Field(default_factory=lambda: [-1, 1, 1])  # (data, fsdp, tensor)

    @field_validator("shape", mode="before")
    @classmethod
    def _tuple_ok(cls, value):
        return list(value) if isinstance(value, tuple) else value

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, value: list[int]) -> list[int]:
        if len(value) != len(MESH_AXES):
            raise ValueError(f"expected {len(MESH_AXES)} entries ({', '.join(MESH_AXES)}), "
                             f"got {len(value)}: {value}")
        if any(v == 0 or v < -1 for v in value):
            raise ValueError(f"entries must be positive or -1 (all remaining devices), got {value}")
        if value.count(-1) > 1:
            raise ValueError(f"at most one entry may be -1, got {value}")
        return value


class DataSection(_Section):
    prompts: str | None = None            # prompt source spec (file, folder or tfds:...) for generation
    pairs: str | None = None              # precomputed pairs jsonl used for epoch 1
    teacher_responses: str | None = None  # precomputed teacher generations jsonl
    max_length: int = Field(1024, gt=0)
    max_prompt_length: int = Field(512, gt=0)

    paths_as_text = field_validator("prompts", "pairs", "teacher_responses",
                                    mode="before")(classmethod(_fspath))


class GenerationSection(_Section):
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)               # 0 = off
    max_new_tokens: int = Field(1024, gt=0)
    batch_size: int = Field(64, gt=0)         # decoding slots, all devices (continuous batching)
    regenerate_student: bool = True           # Algorithm 1: new y_s from the current student each epoch


class ObjectiveSection(_Section):
    name: ObjectiveName = "distillm2"
    alpha: float = Field(0.1, ge=0.0, le=1.0)       # a0: skew of SKL/SRKL, upper end of the curriculum
    alpha_min: float = Field(0.01, ge=0.0, le=1.0)  # lower end of the curriculum
    curriculum: bool = True                          # per-sample a from epoch 2 on
    beta_schedule: Literal["constant", "linear", "paper"] = "paper"
    beta: float = Field(0.5, ge=0.0, le=1.0)        # b0: SRKL weight (start value)
    skew_stopgrad: bool = True                       # stop-gradient on q inside the SRKL mixture
    reduction: Literal["sequence", "token"] = "sequence"
    normalization: Literal["paper", "authors_code"] = "paper"
    gkd_beta: float = Field(0.9, ge=0.0, le=1.0)
    dpkd_beta: float = Field(0.1, gt=0.0)
    dpo_beta: float = Field(0.1, gt=0.0)              # DPO / IPO temperature
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # conservative DPO: P(chosen label is wrong)
    chunk_size: int = Field(128, gt=0)               # positions per chunk of the chunked loss


class OptimSection(_Section):
    lr: float = Field(5e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)     # global-norm clip; null = off
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)


class TrainSection(_Section):
    epochs: int = Field(3, gt=0)
    global_batch: int = Field(128, gt=0)              # pairs per optimizer step
    micro_batch: int | None = Field(None, gt=0)       # pairs per forward/backward; null = global_batch
    max_steps_per_epoch: int | None = Field(None, gt=0)
    log_every: int = Field(10, gt=0)

    @property
    def micro_batch_size(self) -> int:
        """Pairs per forward/backward pass (across all devices)."""
        return self.global_batch if self.micro_batch is None else self.micro_batch

    @property
    def grad_accum(self) -> int:
        """Micro-batches accumulated per optimizer step."""
        return self.global_batch // self.micro_batch_size


class LoraSection(_Section):
    enabled: bool = False
    rank: int = Field(16, gt=0)
    alpha: float = Field(128.0, gt=0.0)   # scale = alpha / rank
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))

    @field_validator("targets", mode="before")
    @classmethod
    def _tuple_ok(cls, value):
        return list(value) if isinstance(value, tuple) else value

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"expected at least one of {', '.join(LORA_TARGETS)}")
        bad = [t for t in value if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown target {bad[0]!r} (choose from {', '.join(LORA_TARGETS)})")
        dup = sorted({t for t in value if value.count(t) > 1})
        if dup:
            raise ValueError(f"target {dup[0]!r} is listed twice")
        return value


class CheckpointSection(_Section):
    every_steps: int = Field(500, gt=0)
    keep: int = Field(3, gt=0)
    async_save: bool = True


class DistributedSection(_Section):
    """How long processes of a multi-host run wait for each other (`distributed.initialize`).

    When a process dies, the others notice its missing heartbeats and exit non-zero after
    `heartbeat_timeout_s`, naming the lost process, instead of hanging in a collective; rerun
    the same command to resume from the last complete checkpoint."""
    heartbeat_timeout_s: int = Field(100, gt=0)       # a silent peer is declared dead after this
    initialization_timeout_s: int = Field(300, gt=0)  # every process must join within this


class LoggingSection(_Section):
    tensorboard: bool = True
    progress: bool = True


class Config(_Section):
    """The whole run configuration. `Config()` gives the defaults (model paths unset)."""

    run_dir: str = "runs/distillm2"
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    mesh: MeshSection = Field(default_factory=MeshSection)
    data: DataSection = Field(default_factory=DataSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    # dotted key -> where its value came from ("run.yaml" or "override k=v"); for messages only.
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def __init__(self, **data: Any):
        """Build in code: `Config(model={"teacher": t, "student": s})`; errors are ConfigError."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise from_validation_error(exc, _SOURCES.get(), Config) from None

    def __eq__(self, other: object) -> bool:
        """Equal when every key is equal (where the values came from does not matter)."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # lists inside: not hashable

    run_dir_as_text = field_validator("run_dir", mode="before")(classmethod(_fspath))

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        o, t, d = self.objective, self.train, self.data
        if o.alpha_min > o.alpha:
            raise ConfigError(f"must be <= objective.alpha ({o.alpha}), got {o.alpha_min}",
                              "objective.alpha_min")
        if t.global_batch % t.micro_batch_size:
            raise ConfigError(f"must divide train.global_batch ({t.global_batch}), got {t.micro_batch}",
                              "train.micro_batch")
        if d.max_prompt_length >= d.max_length:
            raise ConfigError(f"must be smaller than data.max_length ({d.max_length}), "
                              f"got {d.max_prompt_length}", "data.max_prompt_length")
        quant_mode = self.model.quantization.mode
        if quant_mode == "qlora" and not self.lora.enabled:
            raise ConfigError("qlora trains LoRA adapters on the frozen quantized base: set lora.enabled: true",
                              "model.quantization.mode")
        if quant_mode == "qat" and self.lora.enabled:
            raise ConfigError("qat trains the full (fake-quantized) weights; for LoRA on a quantized base "
                              "use mode: qlora", "model.quantization.mode")
        objective = objectives.get(o.name)
        if self.model.reference is not None and not objective.reference:
            raise ConfigError(f"the frozen reference of objectives {', '.join(_reference_objectives())} "
                              f"only; objective {o.name} does not use it, got {self.model.reference}",
                              "model.reference")
        if o.label_smoothing and "label_smoothing" not in objective.options:
            users = [n for n in objectives.NAMES if "label_smoothing" in objectives.get(n).options]
            raise ConfigError(f"applies to objective {', '.join(users)} only; objective {o.name} does not use it "
                              f"(set it to 0), got {o.label_smoothing}", "objective.label_smoothing")
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer folder: model.tokenizer, else the teacher's (else the student's)."""
        return self.model.tokenizer or self.model.teacher or self.model.student

    # ------------------------------------------------------------------ checks the trainer calls
    def check_required(self) -> Config:
        """Raise ConfigError unless the model paths this objective needs are set."""
        if not self.model.student:
            raise ConfigError("required", "model.student", self._source("model.student"))
        objective = objectives.get(self.objective.name)
        if objective.reference:   # the teacher's slot holds the reference; only given pairs train
            if not self.data.pairs:
                raise ConfigError(f"required by objective {self.objective.name}: a preference pair file "
                                  f"{{prompt, chosen, rejected}} (as `distillm2 pair` writes; docs/dpo.md)",
                                  "data.pairs", self._source("data.pairs"))
            return self
        teacher_free = (not objective.needs_teacher
                        and (self.data.pairs or self.data.teacher_responses))
        if not self.model.teacher and not teacher_free:
            raise ConfigError("required", "model.teacher", self._source("model.teacher"))
        return self

    def validate_paths(self) -> Config:
        """Check that every configured input path exists (folders for models, files for data).

        Relative paths are relative to the current directory. Returns self.
        """
        self.check_required()
        for key in ("model.teacher", "model.student", "model.tokenizer", "model.reference"):
            value = self._get(key)
            if value is not None and not Path(value).is_dir():
                raise ConfigError(f"{value} is not a folder", key, self._source(key))
        for key in ("data.pairs", "data.teacher_responses"):
            value = self._get(key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{value} is not a file", key, self._source(key))
        for key in ("data.prompts",):
            value = self._get(key)
            if value is None:
                continue
            if value.startswith("tfds:"):
                data_dir = value.partition("@")[2]
                if data_dir and not Path(data_dir).is_dir():
                    raise ConfigError(f"{value}: data dir {data_dir} is not a folder", key,
                                      self._source(key))
            elif not Path(value).exists():
                raise ConfigError(f"{value} does not exist", key, self._source(key))
        return self

    # ------------------------------------------------------------------ helpers
    def _get(self, dotted: str):
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def _source(self, key: str) -> str | None:
        return lookup_source(self._sources, key)


def _reference_objectives() -> list[str]:
    return [n for n in objectives.NAMES if objectives.get(n).reference]


def from_raw(raw: dict, sources: Mapping[str, str]) -> Config:
    """A validated Config from nested dicts (as read from YAML, with overrides applied).

    sources: dotted key -> where its value came from ("run.yaml", "override k=v"); errors name
    it, and the Config keeps it for the path checks of `validate_paths`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections, got {show(raw)}")
    # an empty section in YAML (`lora:` with every key commented out) means its defaults
    raw = {k: ({} if v is None and is_section(k) else v) for k, v in raw.items()}
    token = _SOURCES.set(sources)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_error(exc, sources, Config) from None
    except ConfigError as exc:  # cross-field checks raise ConfigError directly
        if exc.source is None:
            exc = ConfigError(exc.problem, exc.key, lookup_source(sources, exc.key or ""))
        raise exc from None
    finally:
        _SOURCES.reset(token)
    cfg._sources = dict(sources)
    return cfg


def is_section(key: str) -> bool:
    """Whether a top-level key names a section (a mapping of keys) rather than a value."""
    annotation = field_annotation(Config, [key])
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
