"""Configuration errors as one line naming the dotted key and where its value came from.

pydantic reports problems as lists of dicts with locations; users should read
`config error: run.yaml: optim.lr: expected a number, got 'fast'`. The helpers here take the
schema's root model as an argument, so they stay independent of the schema module.
"""
from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from distillm2_jax.errors import UserError


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


def show(value: Any) -> str:
    """A value as a message shows it: YAML spelling for booleans and null, at most 80 characters."""
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


def lookup_source(sources: Mapping[str, str], key: str) -> str | None:
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


def field_annotation(root: type[BaseModel], parts: list[str]):
    """The annotation of a dotted key (as parts) under `root`, or None if it is not a known key."""
    model: Any = root
    annotation = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation
    return annotation


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_all_keys(field.annotation, dotted + "."))
    return keys


def _suggest(root: type[BaseModel], unknown: str) -> str | None:
    """The most likely intended key: the only key with this exact last name (`lr` -> `optim.lr`),
    else a sibling with a similar name, else the only key with a similar last name."""
    parts = unknown.split(".")
    parent, leaf = parts[:-1], parts[-1]
    by_leaf: dict[str, list[str]] = {}
    for k in _all_keys(root):
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    if len(by_leaf.get(leaf, [])) == 1:
        return by_leaf[leaf][0]
    annotation = field_annotation(root, parent) if parent else root
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        close = difflib.get_close_matches(leaf, list(annotation.model_fields), n=1, cutoff=0.6)
        if close:
            return ".".join(parent + close)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if close and len(by_leaf[close[0]]) == 1:
        return by_leaf[close[0]][0]
    return None


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


def _problem(root: type[BaseModel], err: dict) -> tuple[str | None, str]:
    """(key, problem) for one pydantic error."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    key = _loc_key(loc)
    if kind == "extra_forbidden":
        hint = _suggest(root, key)
        return None, f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if kind == "missing":
        return key, "required"
    if kind in _EXPECT:
        expect = _EXPECT[kind]
        annotation = field_annotation(root, [p for p in loc if isinstance(p, str)])
        if annotation is not None and type(None) in typing.get_args(annotation):
            expect += " or null"
        return key, f"expected {expect}, got {show(value)}"
    if kind == "literal_error":
        annotation = field_annotation(root, [p for p in loc if isinstance(p, str)])
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        expected = ", ".join(repr(c) for c in choices) or err["ctx"]["expected"]
        return key, f"expected one of {expected}, got {show(value)}"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return key, f"must be {op} {err['ctx'][name]}, got {show(value)}"
    msg = str(err.get("msg", kind))
    msg = msg.removeprefix("Value error, ")
    return key, msg[:1].lower() + msg[1:]


def from_validation_error(exc: ValidationError, sources: Mapping[str, str],
                          root: type[BaseModel]) -> ConfigError:
    """One ConfigError (one line) for all of a ValidationError's problems (up to 5 listed).

    sources: dotted key -> where its value came from, so each problem can name the file or
    override; root: the schema's top model, for key suggestions and expected types.
    """
    errors = exc.errors(include_url=False)
    shown = []
    for err in errors[:5]:
        key, problem = _problem(root, err)
        shown.append((key, problem, lookup_source(sources, key or _loc_key(tuple(err["loc"])))))
    if len(shown) == 1:
        key, problem, source = shown[0]
        return ConfigError(problem, key, source)
    text = "; ".join(_format(p, k, s).removeprefix("config error: ") for k, p, s in shown)
    if len(errors) > len(shown):
        text += f"; and {len(errors) - len(shown)} more"
    combined = ConfigError(text)
    combined.key, combined.source = shown[0][0], shown[0][2]
    return combined
