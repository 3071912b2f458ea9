"""The demo's procedural task: short instructions whose answers can be checked exactly.

Three skills, mixed in one instruction-following set (every prompt names its skill):

    reverse  "Reverse: kitten"      -> "nettik"
    sort     "Sort: dbca"            -> "abcd"
    add      "Add: 47 + 85"          -> "132"

The response is the bare answer, so exact match is a string comparison after
`answers.extract_answer`; a response that does not have the shape of an answer of its skill
(empty, several lines, letters in a sum, ...) is *malformed* and counts as wrong.
Examples are a pure function of (n, seed, split), and held-out prompts (a fixed eighth, by
hash) never appear in a training split.
"""
from __future__ import annotations

import dataclasses
import random
import re
import zlib
from pathlib import Path

from distillm2_jax import answers
from distillm2_jax.data import generations

SKILLS = ("reverse", "sort", "add")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TEMPLATES = {
    "reverse": "Reverse: {x}",
    "sort": "Sort: {x}",
    "add": "Add: {x}",
}
_PROMPT_RE = re.compile(r"^(Reverse|Sort|Add): (.+)$")
_SKILL_OF = {"Reverse": "reverse", "Sort": "sort", "Add": "add"}
# The answer alphabet of each skill: anything else in an extracted answer is malformed.
_ANSWER_RE = {"reverse": re.compile(r"^[a-z]+$"), "sort": re.compile(r"^[a-z]+$"),
              "add": re.compile(r"^[0-9]+$")}
# Held-out prompts are a fixed eighth of all prompts, chosen by a hash of the prompt text, so no
# training split (of any seed, including the one the packaged teacher was trained on) contains one.
SPLITS = ("teacher", "sft", "distill", "heldout")
_HELDOUT_BUCKETS = 8


def is_heldout(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out eighth (never drawn by a training split)."""
    return zlib.crc32(prompt.encode()) % _HELDOUT_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class Example:
    skill: str
    prompt: str
    answer: str

    def record(self) -> dict:
        """The JSONL record the pipeline reads (`prompt`, `answer`, `skill`)."""
        return {"prompt": self.prompt, "answer": self.answer, "skill": self.skill}


def _solve(skill: str, x: str) -> str:
    if skill == "reverse":
        return x[::-1]
    if skill == "sort":
        return "".join(sorted(x))
    a, b = (int(t) for t in x.split(" + "))
    return str(a + b)


def make_example(rng: random.Random, skill: str) -> Example:
    """One example of `skill`: words of 3-6 letters; sums of two numbers below 100."""
    if skill in ("reverse", "sort"):
        x = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    elif skill == "add":
        x = f"{rng.randint(0, 99)} + {rng.randint(0, 99)}"
    else:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    return Example(skill, _TEMPLATES[skill].format(x=x), _solve(skill, x))


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(skill, operand) of a task prompt; ValueError for a prompt of another shape."""
    m = _PROMPT_RE.match(prompt.strip())
    if not m:
        raise ValueError(f"not a demo task prompt: {prompt!r}")
    skill, x = _SKILL_OF[m.group(1)], m.group(2)
    if skill == "add" and not re.fullmatch(r"[0-9]+ \+ [0-9]+", x):
        raise ValueError(f"not a demo task prompt: {prompt!r}")
    if skill != "add" and not re.fullmatch(r"[a-z]+", x):
        raise ValueError(f"not a demo task prompt: {prompt!r}")
    return skill, x


def reference_answer(prompt: str) -> str:
    """The exact answer of a task prompt (solved from the prompt, not looked up)."""
    return _solve(*parse_prompt(prompt))


def make_examples(n: int, *, seed: int = 0, split: str = "distill", distinct: bool = True) -> list[Example]:
    """n examples of `split` (skills in rotation), a pure function of (n, seed, split, distinct).

    With `distinct`, no prompt repeats (there are 8750 training and 1250 held-out sums, so at
    most about 3750 distinct held-out examples); without it, prompts are drawn independently.

    Training splits ("teacher", "sft", "distill") never contain a held-out prompt; different
    training splits draw independent streams (they may share a few prompts, as real SFT and
    distillation sets do).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "heldout"
    rng = random.Random(f"distillm2-demo:{seed}:{split}")
    out, seen, attempts = [], set(), 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct examples of split {split!r}; use distinct=False")
        ex = make_example(rng, SKILLS[len(out) % len(SKILLS)])
        if is_heldout(ex.prompt) != want_heldout or (distinct and ex.prompt in seen):
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def write_jsonl(path, examples: list[Example], *, with_answers: bool = True) -> Path:
    """Examples as JSONL; `with_answers=False` writes prompts only (for generation)."""
    generations.write_jsonl(str(path), (e.record() if with_answers else {"prompt": e.prompt} for e in examples))
    return Path(path)


def extract(prompt: str, response: str) -> str | None:
    """The answer in `response` to the task `prompt`, or None when the response is malformed."""
    skill, _ = parse_prompt(prompt)
    got = answers.extract_answer(response)
    if got is None or not _ANSWER_RE[skill].match(got):
        return None
    return got


def is_correct(prompt: str, response: str) -> bool:
    """Exact match of the extracted answer with the reference; malformed responses are wrong."""
    got = extract(prompt, response)
    return got is not None and got == reference_answer(prompt)
