"""The generation output format (written by `distillm2 generate`, read by `distillm2 pair`).

One JSON object per line (docs/data.md, "Generation output"):

    {"id": "17", "prompt": "Write a haiku." | [messages], "response": "...",
     "finish_reason": "stop" | "length", "prompt_tokens": 23, "response_tokens": 41, ...}

Required for reading: `prompt` (the ORIGINAL prompt of the source record: a string or a
messages list; never the templated text) and `response` (decoded text without the end-of-turn
token). `id`, `finish_reason`, `prompt_tokens`, `response_tokens` are written by this project
and type-checked when present; any other keys (model, seed, epoch, ...) are carried along.
The authors' vLLM output (a JSON array or JSONL of {"prompt", "format_prompt",
"generated_text"}) is read too: `generated_text` stands for `response`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

from distillm2_jax.data.messages import Message, prompt_from_value, prompt_key
from distillm2_jax.data.records import MalformedCounter, iter_json_records
from distillm2_jax.errors import UserError

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One parsed generation record."""

    where: str
    id: str | None
    prompt: str | list[Message]
    messages: list[Message]
    key: str
    response: str
    finish_reason: str | None
    extra: dict


def make_generation_record(*, id: str, prompt: str | list[Message], response: str,
                           finish_reason: str, prompt_tokens: int, response_tokens: int,
                           **extra: Any) -> dict:
    """Build one output record in this project's format (validated, key order fixed)."""
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    rec = {"id": str(id), "prompt": prompt, "response": response, "finish_reason": finish_reason,
           "prompt_tokens": int(prompt_tokens), "response_tokens": int(response_tokens)}
    rec.update(extra)
    return rec


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records as JSON lines (UTF-8, no ASCII escaping) atomically; returns the count."""
    tmp = f"{path}.tmp"
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def parse_generation(data: dict, where: str) -> Generation:
    """Validate one record (this project's or the authors' vLLM format) -> Generation."""
    if "prompt" not in data:
        raise UserError(f"{where}: missing field `prompt`")
    original, messages = prompt_from_value(data["prompt"], where, "prompt")
    if "response" in data:
        field = "response"
    elif "generated_text" in data:
        field = "generated_text"
    else:
        raise UserError(f"{where}: missing field `response` (or the vLLM `generated_text`)")
    response = data[field]
    if not isinstance(response, str):
        raise UserError(f"{where}: field `{field}`: expected a string, got {type(response).__name__}")
    finish = data.get("finish_reason")
    if finish is not None and finish not in FINISH_REASONS:
        raise UserError(f"{where}: field `finish_reason`: expected one of {FINISH_REASONS}, got {finish!r}")
    for key in ("prompt_tokens", "response_tokens"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UserError(f"{where}: field `{key}`: expected a non-negative integer, got {value!r}")
    rid = data.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise UserError(f"{where}: field `id`: expected a string or integer, got {type(rid).__name__}")
    known = {"id", "prompt", "response", "generated_text", "finish_reason"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Generation(where=where, id=None if rid is None else str(rid), prompt=original,
                      messages=messages, key=prompt_key(messages), response=response,
                      finish_reason=finish, extra=extra)


def read_generations(path: str, *, skip_malformed: bool = False,
                     counter: MalformedCounter | None = None) -> list[Generation]:
    """Read a generation output file (JSONL or JSON array).

    A malformed line raises `UserError` naming file and line; with `skip_malformed` it is
    skipped and counted in `counter` (a `MalformedCounter`).
    """
    counter = counter if counter is not None else MalformedCounter()
    out = []
    for raw in iter_json_records(path, skip_malformed=skip_malformed, counter=counter):
        try:
            out.append(parse_generation(raw.data, raw.where))
        except UserError as err:
            if not skip_malformed:
                raise
            counter.add(str(err))
    return out
