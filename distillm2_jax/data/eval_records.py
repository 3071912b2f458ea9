"""Held-out evaluation records for `distillm2 eval`: a prompt, and optionally a reference
answer (for exact match) and a reference response (for NLL and the acceptance rate).

Accepted per record (any source spec `data.records.iter_records` reads):

* a pair record (`chosen` / `rejected`, as `distillm2 pair` writes): reference response = chosen;
* a generation record (`prompt` + `response`, as `distillm2 generate` writes);
* a prompt record (`prompt`, `messages` or `instruction`) with no response.

Any of them may carry `answer` (a string or number): the reference for exact match.
"""
from __future__ import annotations

import dataclasses
import math

from distillm2_jax.data.messages import Message, prompt_from_record
from distillm2_jax.data.pairs import Pair, parse_pair
from distillm2_jax.data.records import iter_records
from distillm2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    where: str
    messages: list[Message]
    answer: str | None
    response: str | None

    def as_pair(self) -> Pair:
        return Pair(self.messages, self.response or "", self.response or "", self.where)


def parse_eval_record(data: dict, where: str) -> EvalRecord:
    answer = data.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise UserError(f"{where}: field `answer`: expected a string or number, got {type(answer).__name__}")
        if isinstance(answer, float) and not math.isfinite(answer):
            raise UserError(f"{where}: field `answer`: expected a finite number, got {answer}")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)     # JSON 72.0 is the answer "72", not "72.0"
        answer = str(answer)
    if "chosen" in data or "rejected" in data:
        pair = parse_pair(data, where)
        return EvalRecord(where, pair.messages, answer, pair.chosen)
    _, messages = prompt_from_record(data, where)
    field = "response" if "response" in data else "generated_text"
    response = data.get(field)
    if response is not None and not isinstance(response, str):
        raise UserError(f"{where}: field `{field}`: expected a string, got {type(response).__name__}")
    return EvalRecord(where, messages, answer, response)


def read_eval_records(spec: str, *, limit: int | None = None) -> list[EvalRecord]:
    """Parse every record of `spec` (errors name the file and line); at least one is required."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    out = []
    for raw in iter_records(spec):
        out.append(parse_eval_record(raw.data, raw.where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{spec}: no records")
    return out
