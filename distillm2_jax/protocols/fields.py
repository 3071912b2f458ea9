"""Reading the evaluation protocols' input files: every record through `data.records.iter_records`
(JSONL, JSON, parquet, a saved HF dataset folder), errors naming the file and line or record."""
from __future__ import annotations

from collections.abc import Sequence

from distillm2_jax.data.records import iter_records
from distillm2_jax.errors import UserError


def read_all(spec: str, what: str, *, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) for every record of `spec`; at least one; `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    out = []
    for raw in iter_records(spec):
        out.append((raw.where, raw.data))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{spec}: no records ({what})")
    return out


def text(data: dict, names: Sequence[str], where: str, *, required: bool = True) -> str | None:
    """The first of the fields `names` present in `data`, as a string (numbers are written out:
    GSM8K-style answers are sometimes numbers); None or a UserError naming `where` when absent."""
    for name in names:
        if name in data and data[name] is not None:
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise UserError(f"{where}: field `{name}`: expected a string, got {type(value).__name__}")
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            return str(value)
    if required:
        fields = " or ".join(f"`{n}`" for n in names)
        raise UserError(f"{where}: missing field {fields}")
    return None


def task_id(data: dict, where: str) -> str:
    """The record's `task_id` (HumanEval strings and MBPP integers alike) as a string."""
    value = data.get("task_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: field `task_id`: expected a string or integer"
                        + ("" if value is not None else ", missing"))
    return str(value)
