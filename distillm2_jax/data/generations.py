"""The generation output format (written by `distillm2 generate`, read by `distillm2 pair`).

One JSON object per line (docs/data.md, "Generation output"):

    {"id": "17", "prompt": "Write a haiku." | [messages], "response": "...",
     "finish_reason": "stop" | "length", "prompt_tokens": 23, "response_tokens": 41,
     "response_ids": [791, 3, ...], "tokenizer": "vocab-sha256:...", ...}

Required for reading: `prompt` (the ORIGINAL prompt of the source record: a string or a
messages list; never the templated text) and `response` (decoded text without the end-of-turn
token). `id`, `finish_reason`, `prompt_tokens`, `response_tokens` are written by this project
and type-checked when present; any other keys (model, seed, epoch, ...) are carried along.

`response_ids` are the sampled token ids exactly as sampled, without the stop token that ended
the row (`response` = their decode with special tokens skipped). Training uses them instead of
re-encoding `response`, because a sampled sequence is often not the tokenizer's own encoding of
its text. They are only meaningful for one vocabulary, so they come with `tokenizer`, the
`tokenizer_fingerprint` of the tokenizer that sampled them: training uses the ids only when it
equals the training tokenizer's fingerprint.

The authors' vLLM output (a JSON array or JSONL of {"prompt", "format_prompt",
"generated_text"}) is read too: `generated_text` stands for `response`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from distillm2_jax.data.messages import Message, prompt_from_value, prompt_key
from distillm2_jax.data.records import MalformedCounter, iter_json_records
from distillm2_jax.errors import UserError
from distillm2_jax.jsonio import show

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
    response_ids: list[int] | None = None  # sampled ids without the stop token (module doc)
    tokenizer: str | None = None           # fingerprint of the tokenizer of response_ids


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """"vocab-sha256:<16 hex>" of the tokenizer's id -> token map (added tokens included).

    Token ids mean the same thing exactly when this map is the same, so this, not a path or a
    model name, decides whether stored ids are trusted (e.g. a student of the teacher's family
    shares the teacher's vocabulary and its ids). Cached per tokenizer object and size.
    """
    size = len(tokenizer)
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    items = sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()
    fingerprint = f"vocab-sha256:{digest[:16]}"
    try:
        _FINGERPRINTS[tokenizer] = (size, fingerprint)
    except TypeError:
        pass
    return fingerprint


def check_token_ids(value, where: str, field: str) -> list[int]:
    """A list of non-negative ints (JSON list, or a numpy array from parquet/TFDS) -> list[int]."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: field `{field}`: expected a list of token ids, got "
                        f"{type(value).__name__}")
    for j, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < 2**31:  # int32 arrays
            raise UserError(f"{where}: field `{field}`: item {j} is {show(x)}, expected a non-negative "
                            f"integer token id")
    return [int(x) for x in value]


def check_fingerprint(value, where: str, field: str, ids_field: str) -> str:
    if value is None:
        raise UserError(f"{where}: field `{ids_field}` needs `{field}`, the fingerprint of the "
                        f"tokenizer that made the ids (generations.tokenizer_fingerprint)")
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: field `{field}`: expected a tokenizer fingerprint string, got {show(value)}")
    return value


def make_generation_record(*, id: str, prompt: str | list[Message], response: str,
                           finish_reason: str, prompt_tokens: int, response_tokens: int,
                           response_ids: Sequence[int] | None = None, tokenizer: str | None = None,
                           **extra: Any) -> dict:
    """Build one output record in this project's format (validated, key order fixed).

    `response_ids` (the sampled ids without the stop token) need `tokenizer`, the sampling
    tokenizer's `tokenizer_fingerprint`.
    """
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    rec = {"id": str(id), "prompt": prompt, "response": response, "finish_reason": finish_reason,
           "prompt_tokens": int(prompt_tokens), "response_tokens": int(response_tokens)}
    if response_ids is not None:
        if not tokenizer:
            raise ValueError("response_ids need the tokenizer fingerprint (tokenizer=...)")
        rec["response_ids"] = [int(i) for i in response_ids]
        rec["tokenizer"] = str(tokenizer)
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
        raise UserError(f"{where}: field `finish_reason`: expected one of {FINISH_REASONS}, got {show(finish)}")
    for key in ("prompt_tokens", "response_tokens"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise UserError(f"{where}: field `{key}`: expected a non-negative integer, got {show(value)}")
    rid = data.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise UserError(f"{where}: field `id`: expected a string or integer, got {type(rid).__name__}")
    ids = fingerprint = None
    if data.get("response_ids") is not None:
        ids = check_token_ids(data["response_ids"], where, "response_ids")
        fingerprint = check_fingerprint(data.get("tokenizer"), where, "tokenizer", "response_ids")
        n, stop = data.get("response_tokens"), finish == "stop"
        if n is not None and finish is not None and len(ids) != n - stop:
            raise UserError(f"{where}: field `response_ids`: {len(ids)} ids but response_tokens={n} "
                            f"and finish_reason={show(finish)} (expected {n - stop}: response_ids leave "
                            f"out the stop token that response_tokens counts)")
    known = {"id", "prompt", "response", "generated_text", "finish_reason", "response_ids", "tokenizer"}
    extra = {k: v for k, v in data.items() if k not in known}
    return Generation(where=where, id=None if rid is None else str(rid), prompt=original,
                      messages=messages, key=prompt_key(messages), response=response,
                      finish_reason=finish, extra=extra, response_ids=ids, tokenizer=fingerprint)


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
