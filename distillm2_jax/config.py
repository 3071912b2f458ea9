"""Typed run configuration: pydantic models, YAML files and dotted `key=value` overrides.

    from distillm2_jax import config
    cfg = config.load("configs/default.yaml", ["train.epochs=2", "mesh.shape=[2,2,2]"])
    cfg = cfg.override(**{"optim.lr": 1e-5}, lora={"enabled": True})   # a new, validated Config
    cfg.validate_paths()                                              # folders/files exist
    config.dump(cfg, "runs/x/config.yaml")

Every section rejects unknown keys and checks types strictly (no "3" -> 3, no True -> 1;
an int is accepted where a number is expected). Values of overrides are parsed as YAML
(`yaml.safe_load` rules plus YAML 1.2 exponent floats such as `5e-5`; never `eval`). Every
problem raises `ConfigError` (a `UserError`) with one line naming the dotted key, e.g.
`config error: optim.lr: expected a number, got 'fast'`; problems with a value read from a
file name the file (`config error: run.yaml: optim.lr: ...`), problems with an override say
so. See docs/config.md for every key.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distillm2_jax import objectives
from distillm2_jax.errors import UserError

__all__ = [
    "CheckpointSection", "Config", "ConfigError", "DataSection", "GenerationSection", "LORA_TARGETS",
    "LoggingSection", "LoraSection", "MeshSection", "ModelSection", "ObjectiveSection", "OptimSection",
    "TrainSection", "dump", "dumps", "load", "parse_override", "with_overrides",
]

# Kept equal to the names used by models.decoder / losses / curriculum (tests check it);
# spelled out here so reading a config never imports JAX.
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


class ConfigError(UserError):
    """A configuration problem; the message is one line naming the key (and file)."""

    def __init__(self, problem: str, key: str | None = None, source: str | None = None):
        self.problem, self.key, self.source = problem, key, source
        super().__init__(_one_line(_format(problem, key, source)))


def _format(problem: str, key: str | None, source: str | None) -> str:
    head = "config error: "
    tail = ""
    if source and source.startswith("override "):
        tail = f" (from {source})"
    elif source:
        head += f"{source}: "
    return head + (f"{key}: " if key else "") + problem + tail


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- schema

# Sources of the values being validated (set by `_validate`) so errors can name the file.
_SOURCES: ContextVar[Mapping[str, str]] = ContextVar("config_sources", default={})

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _fspath(cls, value):
    """Accept pathlib.Path (and other os.PathLike) where a path string is expected."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class ModelSection(_Section):
    teacher: str | None = None   # HF folder of the teacher (required by `load`, see check_required)
    student: str | None = None   # HF folder of the (SFT'd) student
    tokenizer: str | None = None  # HF folder with the tokenizer; None -> the teacher's
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    student_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    remat: Literal["none", "full", "dots", "dots_saveable"] = "none"

    paths_as_text = field_validator("teacher", "student", "tokenizer", mode="before")(classmethod(_fspath))


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
    batch_size: int = Field(64, gt=0)         # prompts per generation batch (all devices)
    regenerate_student: bool = True           # Algorithm 1: new y_s from the current student each epoch


class ObjectiveSection(_Section):
    name: Literal["distillm2", "distillm", "kd", "rkl", "seqkd", "gkd", "dpkd", "sft"] = "distillm2"
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
            raise _from_validation_error(exc, _SOURCES.get()) from None

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
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer folder: model.tokenizer, else the teacher's (else the student's)."""
        return self.model.tokenizer or self.model.teacher or self.model.student

    # ------------------------------------------------------------------ copies
    def override(self, **changes: Any) -> Config:
        """A new validated Config with `changes` applied.

        Keys are top-level names or dotted keys (`**{"train.epochs": 2}`); dict values are
        merged into sections (`lora={"enabled": True}` keeps the other lora keys).
        """
        raw = self.model_dump()
        sources = dict(self._sources)
        for key, value in changes.items():
            parts = _split_key(key, what=f"override {key!r}")
            source = f"override {key}={_show(value)}"
            _set_path(raw, parts, _plain(value), source)
            sources[".".join(parts)] = source
        return _validate(raw, sources)

    # ------------------------------------------------------------------ checks the trainer calls
    def check_required(self) -> Config:
        """Raise ConfigError unless the model paths this objective needs are set."""
        if not self.model.student:
            raise ConfigError("required", "model.student", self._source("model.student"))
        teacher_free = (not objectives.get(self.objective.name).needs_teacher
                        and (self.data.pairs or self.data.teacher_responses))
        if not self.model.teacher and not teacher_free:
            raise ConfigError("required", "model.teacher", self._source("model.teacher"))
        return self

    def validate_paths(self) -> Config:
        """Check that every configured input path exists (folders for models, files for data).

        Relative paths are relative to the current directory. Returns self.
        """
        self.check_required()
        for key in ("model.teacher", "model.student", "model.tokenizer"):
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
        return _lookup_source(self._sources, key)


# ----------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """safe_load rules, plus YAML 1.2 floats without a dot (`5e-5`), plus duplicate-key errors."""

    def construct_object(self, node, deep=False):
        # yaml raises plain ValueError for a value it cannot build (`2001-02-30`, an integer
        # past Python's 4300-digit limit): name its line like other YAML errors.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:
            raise ConfigError(f"line {node.start_mark.line + 1}: invalid value "
                              f"({str(err).splitlines()[0][:200]})") from None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {_show(key)} is not a name")
        if key in out:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except RecursionError:  # yaml's composer recurses once per nesting level
        raise ConfigError("invalid YAML (nested too deeply)") from None


def _read_utf8(path: Path) -> str:
    """The file's text; invalid UTF-8 is a ConfigError naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError("no such file" if not path.exists() else "is not a file", source=str(path))
    try:
        data = _yaml_load(_read_utf8(path))
    except ConfigError as err:
        raise ConfigError(err.problem, err.key, str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}invalid YAML ({problem})", source=str(path)) from None
    except OSError as err:
        raise ConfigError(f"cannot read ({err})", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {_show(data)}",
                          source=str(path))
    return data


# ----------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _split_key(key: str, *, what: str) -> list[str]:
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ConfigError(f"{what}: {key!r} is not a dotted key like train.epochs")
    return key.split(".")


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=VALUE"` -> ("a.b", YAML-parsed VALUE).

    A value for a string field (`model.student=2024`) is kept as the literal text; an empty
    value means null.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (e.g. train.epochs=3)")
    key, _, raw = text.partition("=")
    parts = _split_key(key, what=f"override {text!r}")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ConfigError) as err:
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"value is not valid YAML ({problem})", ".".join(parts),
                          f"override {text}") from None
    if value is not None and not isinstance(value, str) and _is_string_field(parts):
        value = raw.strip()
    return ".".join(parts), value


def _field_annotation(parts: list[str]):
    """The annotation of a dotted key in the schema, or None if it is not a known key."""
    model: Any = Config
    annotation = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    return annotation


def _is_section(key: str) -> bool:
    annotation = _field_annotation([key])
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_string_field(parts: list[str]) -> bool:
    annotation = _field_annotation(parts)
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a is str for a in args)
    return False


def _set_path(raw: dict, parts: list[str], value: Any, source: str | None) -> None:
    """raw[parts[0]]...[parts[-1]] = value, creating sections; dict values merge into sections."""
    for n in range(1, len(parts)):
        annotation = _field_annotation(parts[:n])
        if annotation is not None and not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"is a value, not a section (cannot set {'.'.join(parts)})",
                              ".".join(parts[:n]), source)
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"is a value, not a section (cannot set {'.'.join(parts)})",
                              ".".join(parts[: i + 1]), source)
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            _set_path(raw, parts + [str(k)], v, source)
    else:
        node[last] = value


def _plain(value: Any) -> Any:
    """Sections (pydantic models) given to override() as values -> dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _leaf_keys(raw: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(raw, dict) and raw:
        for k, v in raw.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    elif prefix:
        yield prefix


def _lookup_source(sources: Mapping[str, str], key: str) -> str | None:
    """Source of `key` or of its closest parent/child key that was set explicitly."""
    key = re.sub(r"\[\d+\]", "", key)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:n]))
        if found:
            return found
    for k, v in sources.items():  # a whole section was set (e.g. `train={...}`), error inside it
        if k.startswith(key + "."):
            return v
    return None


# ----------------------------------------------------------------------------- validation

def _all_keys(model=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_all_keys(field.annotation, dotted + "."))
    return keys


def _suggest(unknown: str) -> str | None:
    """The most likely intended key: the only key with this exact last name (`lr` -> `optim.lr`),
    else a sibling with a similar name, else the only key with a similar last name."""
    parts = unknown.split(".")
    parent, leaf = parts[:-1], parts[-1]
    by_leaf: dict[str, list[str]] = {}
    for k in _all_keys():
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    if len(by_leaf.get(leaf, [])) == 1:
        return by_leaf[leaf][0]
    annotation = _field_annotation(parent) if parent else Config
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        close = difflib.get_close_matches(leaf, list(annotation.model_fields), n=1, cutoff=0.6)
        if close:
            return ".".join(parent + close)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if close and len(by_leaf[close[0]]) == 1:
        return by_leaf[close[0]][0]
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _loc_key(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_EXPECT = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "model_type": "a section (a mapping of keys)", "dict_type": "a section (a mapping of keys)",
    "model_attributes_type": "a section (a mapping of keys)", "finite_number": "a finite number",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _problem(err: dict) -> tuple[str | None, str]:
    """(key, problem) for one pydantic error."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    key = _loc_key(loc)
    if kind == "extra_forbidden":
        hint = _suggest(key)
        return None, f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if kind == "missing":
        return key, "required"
    if kind in _EXPECT:
        expect = _EXPECT[kind]
        annotation = _field_annotation([p for p in loc if isinstance(p, str)])
        if annotation is not None and type(None) in typing.get_args(annotation):
            expect += " or null"
        return key, f"expected {expect}, got {_show(value)}"
    if kind == "literal_error":
        annotation = _field_annotation([p for p in loc if isinstance(p, str)])
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        expected = ", ".join(repr(c) for c in choices) or err["ctx"]["expected"]
        return key, f"expected one of {expected}, got {_show(value)}"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return key, f"must be {op} {err['ctx'][name]}, got {_show(value)}"
    msg = str(err.get("msg", kind))
    msg = msg.removeprefix("Value error, ")
    return key, msg[:1].lower() + msg[1:]


def _from_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """One ConfigError (one line) for all of a ValidationError's problems (up to 5 listed)."""
    errors = exc.errors(include_url=False)
    shown = []
    for err in errors[:5]:
        key, problem = _problem(err)
        shown.append((key, problem, _lookup_source(sources, key or _loc_key(tuple(err["loc"])))))
    if len(shown) == 1:
        key, problem, source = shown[0]
        return ConfigError(problem, key, source)
    text = "; ".join(_format(p, k, s).removeprefix("config error: ") for k, p, s in shown)
    if len(errors) > len(shown):
        text += f"; and {len(errors) - len(shown)} more"
    combined = ConfigError(text)
    combined.key, combined.source = shown[0][0], shown[0][2]
    return combined


def _validate(raw: dict, sources: Mapping[str, str]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections, got {_show(raw)}")
    # an empty section in YAML (`lora:` with every key commented out) means its defaults
    raw = {k: ({} if v is None and _is_section(k) else v) for k, v in raw.items()}
    token = _SOURCES.set(sources)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise _from_validation_error(exc, sources) from None
    except ConfigError as exc:  # cross-field checks raise ConfigError directly
        if exc.source is None:
            exc = ConfigError(exc.problem, exc.key, _lookup_source(sources, exc.key or ""))
        raise exc from None
    finally:
        _SOURCES.reset(token)
    cfg._sources = dict(sources)
    return cfg


# ----------------------------------------------------------------------------- public API

def load(path: str | os.PathLike | None, overrides: Iterable[str] = (), *,
         require: bool = True) -> Config:
    """Read a YAML file (None: start from the defaults) and apply `key=value` overrides.

    With `require` (default) the model paths must be set (see `Config.check_required`).
    """
    raw: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        sources.update({k: str(path) for k in _leaf_keys(raw)})
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key.split("."), value, f"override {text}")
        sources[key] = f"override {text}"
        sources.update({f"{key}.{k}": f"override {text}" for k in _leaf_keys(value)})
    cfg = _validate(raw, sources)
    if require:
        cfg.check_required()
    return cfg


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A new validated Config: `cfg` with `key=value` strings applied (parsed as in `load`)."""
    raw = cfg.model_dump()
    sources = dict(cfg._sources)
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key.split("."), value, f"override {text}")
        sources[key] = f"override {text}"
    return _validate(raw, sources)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`shape: [-1, 1, 1]`)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dumps(cfg: Config) -> str:
    """The config as YAML text (every key, sections in schema order)."""
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, width=100)


def dump(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the config as YAML (`load(path)` gives an equal Config). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# distillm2-jax run configuration (docs/config.md)\n" + dumps(cfg))
    return path
