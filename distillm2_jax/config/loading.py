"""Configs from and to text: YAML files, `key=value` overrides, and YAML dumps.

    from distillm2_jax import config
    cfg = config.load("configs/default.yaml", ["train.epochs=2", "mesh.shape=[2,2,2]"])
    cfg = config.with_overrides(cfg, {"optim.lr": 1e-5, "lora": {"enabled": True}})
    config.dump(cfg, "runs/x/config.yaml")

Values of `key=value` overrides are parsed as YAML (`yaml.safe_load` rules plus YAML 1.2
exponent floats such as `5e-5`; never `eval`), the same dialect as config files. Problems raise
ConfigError naming the file, or saying which override, so a user knows what to fix.
"""
from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from distillm2_jax.config.errors import ConfigError, field_annotation, show
from distillm2_jax.config.schema import Config, from_raw

# `"key=value"` strings as on the command line, or dotted keys -> Python values.
Overrides = Mapping[str, Any] | Iterable[str] | str


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
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {show(key)} is not a name")
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
        raise ConfigError(f"expected a mapping of sections at the top level, got {show(data)}",
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


def _changes(overrides: Overrides) -> list[tuple[list[str], Any, str]]:
    """(key parts, value, source label) for each override, in order."""
    if isinstance(overrides, Mapping):
        return [(_split_key(str(key), what=f"override {key!r}"), _plain(value), f"override {key}={show(value)}")
                for key, value in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    out = []
    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError(f"override {show(text)}: expected a KEY=VALUE string (e.g. train.epochs=3)")
        key, value = parse_override(text)
        out.append((key.split("."), value, f"override {text}"))
    return out


def _apply(raw: dict, sources: dict[str, str], overrides: Overrides) -> None:
    """Apply overrides to nested dicts in place, noting each set key's source."""
    for parts, value, source in _changes(overrides):
        _set_path(raw, parts, value, source)
        key = ".".join(parts)
        sources[key] = source
        sources.update({f"{key}.{k}": source for k in _leaf_keys(value)})


def _is_string_field(parts: list[str]) -> bool:
    annotation = field_annotation(Config, parts)
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a is str for a in args)
    return False


def _set_path(raw: dict, parts: list[str], value: Any, source: str | None) -> None:
    """raw[parts[0]]...[parts[-1]] = value, creating sections; dict values merge into sections."""
    for n in range(1, len(parts)):
        annotation = field_annotation(Config, parts[:n])
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
    """Sections (pydantic models) given as override values -> dicts."""
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


# ----------------------------------------------------------------------------- public API

def load(path: str | os.PathLike | None, overrides: Overrides = (), *, require: bool = True) -> Config:
    """Read a YAML file (None: start from the defaults) and apply overrides (as `with_overrides`).

    With `require` (default) the model paths must be set (see `Config.check_required`).
    """
    raw: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        sources.update({k: str(path) for k in _leaf_keys(raw)})
    _apply(raw, sources, overrides)
    cfg = from_raw(raw, sources)
    if require:
        cfg.check_required()
    return cfg


def with_overrides(cfg: Config, overrides: Overrides) -> Config:
    """A new validated Config: `cfg` with overrides applied; `cfg` itself is unchanged.

    overrides: `"key=value"` strings as on the command line (values parsed as YAML; a string
    field keeps the literal text), or a mapping of dotted or top-level keys to Python values
    (`{"optim.lr": 1e-5, "lora": {"enabled": True}}`). A dict value is merged into its section
    (the section's other keys are kept). Every check runs again; errors say which override.
    """
    raw = cfg.model_dump()
    sources = dict(cfg._sources)
    _apply(raw, sources, overrides)
    return from_raw(raw, sources)


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
