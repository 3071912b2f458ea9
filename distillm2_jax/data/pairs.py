"""Response pairs: match teacher and student generations by prompt, write and read pair files.

Pair record (one JSON object per line; the format TRL and the DistiLLM-2 authors use):

    {"prompt": "<user prompt>",
     "chosen":   [{"role": "user", "content": ...}, {"role": "assistant", "content": <teacher>}],
     "rejected": [{"role": "user", "content": ...}, {"role": "assistant", "content": <student>}]}

For a messages prompt, chosen/rejected carry the whole conversation with the response appended
and `prompt` is the last user message. Matching is by prompt key (`messages.prompt_key`);
the first record of a duplicated prompt wins and the rest are counted, never silently merged.

Token ids, per side: a pair carries `chosen_ids` + `chosen_tokenizer` exactly when its teacher
record had `response_ids` (+ `tokenizer`), and `rejected_ids` + `rejected_tokenizer` exactly
when its student record had them; each side is independent of the other. Training uses a
side's ids instead of re-encoding its text when the fingerprint is the training tokenizer's
(`batches.PairTokenizer`).
"""
from __future__ import annotations

import dataclasses

from distillm2_jax.data.generations import (Generation, check_fingerprint, check_token_ids,
                                            read_generations, write_jsonl)
from distillm2_jax.data.messages import Message, normalize_messages, prompt_from_value, user_text
from distillm2_jax.data.records import MalformedCounter, iter_records
from distillm2_jax.errors import UserError


@dataclasses.dataclass
class PairStats:
    """What `build_pairs` did: every input record is accounted for in one of these counts."""

    teacher_records: int = 0
    student_records: int = 0
    pairs: int = 0
    teacher_unmatched: int = 0
    student_unmatched: int = 0
    teacher_duplicates: int = 0
    student_duplicates: int = 0
    teacher_malformed: int = 0
    student_malformed: int = 0
    chosen_with_ids: int = 0     # pairs whose chosen side carries token ids
    rejected_with_ids: int = 0   # pairs whose rejected side carries token ids
    # The first few skipped-line messages ("file:line: ..."), to show what --skip-malformed hid.
    skipped_examples: list[str] = dataclasses.field(default_factory=list, compare=False)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs written; teacher: {self.teacher_records} records, "
            f"{self.teacher_unmatched} unmatched, {self.teacher_duplicates} duplicate prompts, "
            f"{self.teacher_malformed} malformed skipped; student: {self.student_records} records, "
            f"{self.student_unmatched} unmatched, {self.student_duplicates} duplicate prompts, "
            f"{self.student_malformed} malformed skipped; token ids: chosen {self.chosen_with_ids}, "
            f"rejected {self.rejected_with_ids} of {self.pairs}"
        )


def _first_by_key(gens: list[Generation]) -> tuple[dict[str, Generation], int]:
    by_key: dict[str, Generation] = {}
    duplicates = 0
    for g in gens:
        if g.key in by_key:
            duplicates += 1
        else:
            by_key[g.key] = g
    return by_key, duplicates


def make_pair_record(messages: list[Message], chosen: str, rejected: str, *,
                     chosen_ids: list[int] | None = None, chosen_tokenizer: str | None = None,
                     rejected_ids: list[int] | None = None,
                     rejected_tokenizer: str | None = None) -> dict:
    """One pair record in the TRL conversational format, plus each side's token ids if given."""
    rec = {
        "prompt": user_text(messages),
        "chosen": [*messages, {"role": "assistant", "content": chosen}],
        "rejected": [*messages, {"role": "assistant", "content": rejected}],
    }
    for side, ids, fingerprint in (("chosen", chosen_ids, chosen_tokenizer),
                                   ("rejected", rejected_ids, rejected_tokenizer)):
        if ids is not None:
            if not fingerprint:
                raise ValueError(f"{side}_ids need {side}_tokenizer (the tokenizer fingerprint)")
            rec[f"{side}_ids"] = [int(i) for i in ids]
            rec[f"{side}_tokenizer"] = fingerprint
    return rec


def build_pairs(teacher_path: str, student_path: str, out_path: str, *,
                skip_malformed: bool = False) -> PairStats:
    """Match teacher (chosen) and student (rejected) outputs by prompt and write a pair JSONL.

    Pairs follow the teacher file's order. Raises `UserError` on a malformed line (naming file
    and line) unless `skip_malformed`, and when no prompt matches (probably the wrong files).
    """
    stats = PairStats()
    t_bad, s_bad = MalformedCounter(), MalformedCounter()
    teacher = read_generations(teacher_path, skip_malformed=skip_malformed, counter=t_bad)
    student = read_generations(student_path, skip_malformed=skip_malformed, counter=s_bad)
    stats.teacher_records, stats.student_records = len(teacher), len(student)
    stats.teacher_malformed, stats.student_malformed = t_bad.count, s_bad.count
    stats.skipped_examples = t_bad.first_errors + s_bad.first_errors
    t_by_key, stats.teacher_duplicates = _first_by_key(teacher)
    s_by_key, stats.student_duplicates = _first_by_key(student)
    records = []
    for key, t in t_by_key.items():
        s = s_by_key.get(key)
        if s is None:
            stats.teacher_unmatched += 1
            continue
        records.append(make_pair_record(t.messages, t.response, s.response,
                                        chosen_ids=t.response_ids, chosen_tokenizer=t.tokenizer,
                                        rejected_ids=s.response_ids, rejected_tokenizer=s.tokenizer))
        stats.chosen_with_ids += t.response_ids is not None
        stats.rejected_with_ids += s.response_ids is not None
    stats.student_unmatched = sum(1 for key in s_by_key if key not in t_by_key)
    stats.pairs = len(records)
    if not records:
        raise UserError(f"no prompt of {teacher_path} matches one of {student_path} "
                        f"({stats.summary()})")
    write_jsonl(out_path, records)
    return stats


# --------------------------------------------------------------------------- reading pairs


@dataclasses.dataclass(frozen=True)
class Pair:
    """A validated pair for training: shared prompt messages and the two response texts, and
    for each side the sampled token ids (without end-of-turn) with their tokenizer's
    fingerprint when the pair file has them (module docstring)."""

    messages: list[Message]
    chosen: str
    rejected: str
    where: str = ""
    chosen_ids: list[int] | None = None
    chosen_tokenizer: str | None = None
    rejected_ids: list[int] | None = None
    rejected_tokenizer: str | None = None


def _side_ids(data: dict, where: str) -> dict:
    """The validated `{side}_ids` / `{side}_tokenizer` fields of a pair record, as Pair kwargs."""
    out = {}
    for side in ("chosen", "rejected"):
        if data.get(f"{side}_ids") is not None:
            out[f"{side}_ids"] = check_token_ids(data[f"{side}_ids"], where, f"{side}_ids")
            out[f"{side}_tokenizer"] = check_fingerprint(data.get(f"{side}_tokenizer"), where,
                                                          f"{side}_tokenizer", f"{side}_ids")
    return out


def _split_conversation(value, where: str, field: str) -> tuple[list[Message], str]:
    msgs = normalize_messages(value, where, field)
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
        raise UserError(f"{where}: field `{field}`: expected a conversation ending with a user "
                        "message followed by the assistant response")
    return msgs[:-1], msgs[-1]["content"]


def parse_pair(data: dict, where: str) -> Pair:
    """Validate one pair record (conversational, or TRL's plain prompt/chosen/rejected strings)."""
    for field in ("chosen", "rejected"):
        if field not in data:
            raise UserError(f"{where}: missing field `{field}`")
    chosen, rejected = data["chosen"], data["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" not in data:
            raise UserError(f"{where}: missing field `prompt` (needed with string chosen/rejected)")
        _, messages = prompt_from_value(data["prompt"], where, "prompt")
        return Pair(messages, chosen, rejected, where, **_side_ids(data, where))
    c_prompt, c_text = _split_conversation(chosen, where, "chosen")
    r_prompt, r_text = _split_conversation(rejected, where, "rejected")
    if c_prompt != r_prompt:
        raise UserError(f"{where}: fields `chosen` and `rejected` have different prompts")
    return Pair(c_prompt, c_text, r_text, where, **_side_ids(data, where))


def read_pairs(spec: str, *, skip_malformed: bool = False,
               counter: MalformedCounter | None = None) -> list[Pair]:
    """Read and validate a pair file (any source spec: JSONL, JSON, parquet, HF folder, tfds:)."""
    counter = counter if counter is not None else MalformedCounter()
    out = []
    for raw in iter_records(spec, skip_malformed=skip_malformed, counter=counter):
        try:
            out.append(parse_pair(raw.data, raw.where))
        except UserError as err:
            if not skip_malformed:
                raise
            counter.add(str(err))
    if not out:
        raise UserError(f"{spec}: no pairs")
    return out

