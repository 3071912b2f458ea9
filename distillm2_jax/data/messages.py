"""Chat messages: validation, prompt extraction from a record, and the prompt key used for matching.

A conversation is a list of `{"role": ..., "content": str}` dicts with roles system / user /
assistant. A prompt is a conversation whose last message is from the user (a trailing assistant
message, e.g. a reference answer in a chat dataset, is dropped). Extra keys of a message are
dropped so that templates see exactly role and content.
"""
from __future__ import annotations

import json
from typing import Any

from distillm2_jax.errors import UserError
from distillm2_jax.jsonio import show

ROLES = ("system", "user", "assistant")
Message = dict  # {"role": str, "content": str}


def normalize_messages(value: Any, where: str, field: str) -> list[Message]:
    """Validate a messages list (or TFDS-style dict of parallel lists) and return clean dicts."""
    if isinstance(value, dict) and set(value) >= {"role", "content"}:
        roles, contents = value["role"], value["content"]
        if not (isinstance(roles, list) and isinstance(contents, list) and len(roles) == len(contents)):
            raise UserError(f"{where}: field `{field}`: role/content lists of different lengths")
        value = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field `{field}`: expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise UserError(f"{where}: field `{field}[{i}]`: expected an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise UserError(
                f"{where}: field `{field}[{i}].role`: expected one of {', '.join(ROLES)}, got {show(role)}"
            )
        if not isinstance(content, str):
            raise UserError(
                f"{where}: field `{field}[{i}].content`: expected a string, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


def prompt_messages(messages: list[Message], where: str, field: str) -> list[Message]:
    """Drop one trailing assistant message and check that the prompt ends with a user turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError(f"{where}: field `{field}`: a prompt must end with a user message")
    return messages


def prompt_from_value(value: Any, where: str, field: str) -> tuple[str | list[Message], list[Message]]:
    """A `prompt` value (string or messages) -> (original prompt as stored, prompt messages)."""
    if isinstance(value, str):
        return value, [{"role": "user", "content": value}]
    if isinstance(value, (list, dict)):
        msgs = prompt_messages(normalize_messages(value, where, field), where, field)
        return msgs, msgs
    raise UserError(
        f"{where}: field `{field}`: expected a string or a list of messages, got {type(value).__name__}"
    )


def prompt_from_record(record: dict, where: str, field: str | None = None
                       ) -> tuple[str | list[Message], list[Message]]:
    """Find the prompt of a dataset record: `prompt`, else `messages`, else `instruction`+`input`.

    `instruction` + non-empty `input` become one user message "instruction\\n\\ninput" (Alpaca
    data without the Alpaca wrapper: the chat template does the wrapping). Returns the original
    prompt (a string, or the messages) and the prompt messages. `field` forces one field.
    """
    if field is not None:
        if field not in record:
            raise UserError(f"{where}: missing field `{field}`")
        if field == "instruction":
            return _instruction(record, where)
        return prompt_from_value(record[field], where, field)
    if "prompt" in record and record["prompt"] is not None:
        return prompt_from_value(record["prompt"], where, "prompt")
    if "messages" in record and record["messages"] is not None:
        return prompt_from_value(record["messages"], where, "messages")
    if "instruction" in record:
        return _instruction(record, where)
    raise UserError(
        f"{where}: no prompt field: expected `prompt` (string or messages), `messages`, or "
        f"`instruction` (+ optional `input`); found keys {show(sorted(record))}"
    )


def _instruction(record: dict, where: str) -> tuple[str, list[Message]]:
    instruction, extra = record.get("instruction"), record.get("input")
    if not isinstance(instruction, str):
        raise UserError(f"{where}: field `instruction`: expected a string, got {type(instruction).__name__}")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: field `input`: expected a string, got {type(extra).__name__}")
    text = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return text, [{"role": "user", "content": text}]


def prompt_key(messages: list[Message]) -> str:
    """The key that matches teacher and student outputs for one prompt.

    A single user turn (the common case) keys on its text, so a string prompt and the same
    text as `[{"role": "user", ...}]` match; longer conversations key on canonical JSON.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def user_text(messages: list[Message]) -> str:
    """The last user message: the `prompt` string of a pair record."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise ValueError("no user message")
