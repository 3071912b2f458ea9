"""The demo's procedural task: worked arithmetic whose every step, and final answer, is checkable.

Two skills, mixed in one instruction-following set (every prompt names its skill). The
response is a worked solution: one step per digit column, right to left, each step using the
carry written by the step before it, then the answer assembled from the steps:

    add  "Add: 4785 + 0936"  -> "5+6+0=11 8+3+1=12 7+9+1=17 4+0+1=05 answer: 05721"
    mul  "Mul: 785 x 7"      -> "5*7+0=35 8*7+3=59 7*7+5=54 answer: 5495"

Operands and answers are zero-padded to a fixed width, so every step sits at the same place in
every response. Responses are 40-50 tokens (one byte a token), long enough for an early slip
to compound: a wrong column sum carries into the next column and into the answer. That is the
regime in which a student trained only on correct prefixes meets states it never saw, and
training on its own responses with the teacher's feedback is supposed to help.

Exact match compares the extracted answer (`answers.extract_answer`: the text after
`answer:`) with the answer solved from the prompt; a response without a well-formed answer of
the skill's width is *malformed* and counts as wrong. Examples are a pure function of
(n, seed, split), and held-out prompts (a fixed eighth, by hash) never appear in a training split.
"""
from __future__ import annotations

import dataclasses
import random
import re
import zlib
from pathlib import Path

from distillm2_jax import answers
from distillm2_jax.data import generations

SKILLS = ("add", "mul")
ADD_DIGITS, MUL_DIGITS = 4, 3
_PROMPT_RE = {
    "add": re.compile(rf"^Add: ([0-9]{{{ADD_DIGITS}}}) \+ ([0-9]{{{ADD_DIGITS}}})$"),
    "mul": re.compile(rf"^Mul: ([0-9]{{{MUL_DIGITS}}}) x ([0-9])$"),
}
# The answer of each skill: a zero-padded number of fixed width; anything else is malformed.
_ANSWER_RE = {"add": re.compile(rf"^[0-9]{{{ADD_DIGITS + 1}}}$"),
              "mul": re.compile(rf"^[0-9]{{{MUL_DIGITS + 1}}}$")}
# Token lengths of the task (one byte a token), here because both the demo run and its
# evaluation read them: prompts are <= 35 tokens and worked solutions <= 49 tokens plus the
# end-of-turn token; training keeps MAX_NEW_TOKENS sampled tokens plus the end-of-turn token.
MAX_PROMPT_LENGTH, MAX_NEW_TOKENS = 36, 55
MAX_LENGTH = MAX_PROMPT_LENGTH + MAX_NEW_TOKENS + 1
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
    solution: str       # the worked response (what supervised training and the teacher produce)

    def record(self) -> dict:
        """The JSONL record the pipeline reads (`prompt`, `answer`, `solution`, `skill`)."""
        return {"prompt": self.prompt, "answer": self.answer, "solution": self.solution, "skill": self.skill}


def solve(skill: str, a: str, b: str) -> tuple[str, str]:
    """(worked solution, answer) for operands as written in the prompt (zero-padded digits)."""
    steps, digits, carry = [], [], 0
    if skill == "add":
        for x, y in zip(reversed(a), reversed(b)):
            s = int(x) + int(y) + carry
            steps.append(f"{x}+{y}+{carry}={s:02d}")
            digits.append(s % 10)
            carry = s // 10
    elif skill == "mul":
        for x in reversed(a):
            s = int(x) * int(b) + carry
            steps.append(f"{x}*{b}+{carry}={s:02d}")
            digits.append(s % 10)
            carry = s // 10
    else:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    answer = f"{carry}" + "".join(str(d) for d in reversed(digits))
    return " ".join(steps) + f" answer: {answer}", answer


def make_example(rng: random.Random, skill: str) -> Example:
    """One example of `skill` with uniformly drawn operands."""
    if skill == "add":
        a, b = (f"{rng.randrange(10 ** ADD_DIGITS):0{ADD_DIGITS}d}" for _ in range(2))
        prompt = f"Add: {a} + {b}"
    elif skill == "mul":
        a, b = f"{rng.randrange(10 ** MUL_DIGITS):0{MUL_DIGITS}d}", str(rng.randrange(10))
        prompt = f"Mul: {a} x {b}"
    else:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")
    solution, answer = solve(skill, a, b)
    return Example(skill, prompt, answer, solution)


def parse_prompt(prompt: str) -> tuple[str, tuple[str, str]]:
    """(skill, operands) of a task prompt; ValueError for a prompt of another shape."""
    text = prompt.strip() if isinstance(prompt, str) else ""
    for skill, pattern in _PROMPT_RE.items():
        m = pattern.match(text)
        if m:
            return skill, (m.group(1), m.group(2))
    raise ValueError(f"not a demo task prompt: {prompt!r}")


def reference_answer(prompt: str) -> str:
    """The exact answer of a task prompt (solved from the prompt, not looked up)."""
    skill, (a, b) = parse_prompt(prompt)
    return solve(skill, a, b)[1]


def reference_solution(prompt: str) -> str:
    """The worked solution of a task prompt."""
    skill, (a, b) = parse_prompt(prompt)
    return solve(skill, a, b)[0]


def make_examples(n: int, *, seed: int = 0, split: str = "distill", distinct: bool = True) -> list[Example]:
    """n examples of `split` (skills in rotation), a pure function of (n, seed, split, distinct).

    With `distinct`, no prompt repeats; without it, prompts are drawn independently.
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


def correct_steps(prompt: str, response: str) -> int:
    """How many leading steps of `response` equal the reference solution's (a finer signal than
    exact match: where the student's worked solution first goes wrong)."""
    want = reference_solution(prompt).split(" ")
    got = response.strip().split(" ")
    n = 0
    for w, g in zip(want, got):
        if w != g or w == "answer:":
            break
        n += 1
    return n
