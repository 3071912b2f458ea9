"""Prompt sources: a spec string -> validated prompt records with stable ids.

This is what generation iterates over. `load_prompts(spec)` reads every record eagerly so a
malformed record fails the run at start-up (with file and line / record index), never halfway
through a multi-hour generation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from distillm2_jax.data.messages import Message, prompt_from_record, prompt_key
from distillm2_jax.data.records import iter_records
from distillm2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt of a source.

    id: stable id, the record's index in the source as a string ("0", "1", ...), so the same
        source always gives the same ids (TFDS: index in the data source's order).
    index: the same index as an int.
    prompt: the original prompt as the source had it: a string (also for instruction+input,
        joined) or the messages list (trailing assistant message dropped). Generation writes it
        back unchanged as the `prompt` of its output records.
    messages: the prompt as chat messages (what the chat template renders).
    key: the matching key (`messages.prompt_key`): the user text for a single-turn prompt.
    where: location for error messages ("file.jsonl:12").
    """

    id: str
    index: int
    prompt: str | list[Message]
    messages: list[Message]
    key: str
    where: str


def load_prompts(spec: str, *, field: str | None = None, limit: int | None = None
                 ) -> list[PromptRecord]:
    """Read all prompts of a source spec (JSON/JSONL/parquet/HF saved dataset/tfds:...).

    `field` forces the prompt field (`prompt`, `messages` or `instruction`); by default the
    first present of prompt > messages > instruction(+input) is used. `limit` keeps the first N.
    """
    out: list[PromptRecord] = []
    for raw in iter_records(spec):
        if limit is not None and len(out) >= limit:
            break
        original, messages = prompt_from_record(raw.data, raw.where, field)
        out.append(PromptRecord(
            id=str(raw.index), index=raw.index, prompt=original, messages=messages,
            key=prompt_key(messages), where=raw.where,
        ))
    if not out:
        raise UserError(f"{spec}: no prompts")
    return out


def shard_prompts(prompts: Sequence[PromptRecord], process_index: int, process_count: int
                  ) -> list[PromptRecord]:
    """Every `process_count`-th prompt starting at `process_index`: disjoint, covering shards."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    return list(prompts[process_index::process_count])
