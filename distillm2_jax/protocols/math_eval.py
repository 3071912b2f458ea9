"""Math pass@1: is a response's final answer equal to the reference? Checked with HF's math-verify.

math-verify (`math_verify.parse` / `verify`) extracts the answer from the text (`\\boxed{}`, "the
answer is", the last expression) and compares it symbolically and numerically: fractions and
decimals, sets, intervals, percentages, units in `\\text{}`, equivalent radicals.

The project's own extraction (`answers.py`) is used in one place only, where the library has no
equivalent: the GSM8K marker. A reference written `... #### 72` (GSM8K's `answer` field) is the
text after the last `####`, and so is a response that uses the marker (math-verify would take the
last number of the text, which for `#### 72 (the total)` is the right one only by luck).

References: a MATH-style solution with `\\boxed{}` is parsed whole; a bare answer (`\\frac{1}{2}`,
`72`, `(1, 2]`) is parsed as LaTeX math.

math-verify stops a slow parse or comparison with `signal.alarm`, which works only in the main
thread of the main interpreter. `check_many` therefore grades in the calling thread when that is
the main thread, and otherwise in one child process (`python -m distillm2_jax.protocols.math_eval`,
reading the pairs as JSON on stdin), never with the library's timeouts switched off.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading

from distillm2_jax import answers
from distillm2_jax.protocols import fields

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str   # as in the file: a GSM8K rationale with `####`, a MATH solution or a bare answer
    where: str


def read_problems(spec: str, *, limit: int | None = None) -> list[MathProblem]:
    """`question` (or `problem`) and `answer` (or `solution`) of every record."""
    return [MathProblem(fields.text(d, ("question", "problem"), w), fields.text(d, ("answer", "solution"), w), w)
            for w, d in fields.read_all(spec, "math problems", limit=limit)]


def _after_hashes(text: str) -> str | None:
    """The GSM8K `####` answer, through the project's own extraction (`answers._HASHES`)."""
    hits = [h for h in answers._HASHES.findall(text) if h.strip()]
    return hits[-1].strip() if hits else None


def _parse_reference(reference: str) -> list:
    from math_verify import parse

    marked = _after_hashes(reference)
    if marked is not None:
        return parse(f"${marked}$")
    if "\\boxed" in reference or "\\fbox" in reference:
        return parse(reference)
    return parse(f"${reference.strip().strip('$')}$")


def _parse_response(response: str) -> list:
    from math_verify import parse

    marked = _after_hashes(response)
    return parse(f"${marked}$") if marked is not None else parse(response)


def check(response: str, reference: str) -> dict:
    """{"correct", "extracted", "reference_ok"}: whether the response's answer equals the reference's.

    extracted is None when no answer was found in the response (malformed); reference_ok is
    False when the reference itself could not be parsed (then the response counts as wrong).
    Call from the main thread (see the module doc) or use `check_many`.
    """
    from math_verify import verify

    gold = _parse_reference(reference)
    pred = _parse_response(response) if isinstance(response, str) else []
    extracted = str(pred[-1]) if pred else None
    correct = bool(gold and pred and verify(gold, pred))
    return {"correct": correct, "extracted": extracted, "reference_ok": bool(gold)}


def _check_all(pairs: list[tuple[str, str]]) -> list[dict]:
    return [check(r, a) for r, a in pairs]


def check_many(responses: list[str], references: list[str]) -> list[dict]:
    """`check` for every (response, reference), with math-verify's timeouts working from any thread."""
    pairs = list(zip(responses, references, strict=True))
    if threading.current_thread() is threading.main_thread():
        return _check_all(pairs)
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(pairs), capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"math grading process failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


@dataclasses.dataclass(frozen=True)
class MathResult:
    accuracy: float          # pass@1: correct / total
    correct: int
    total: int
    no_answer: int           # responses with no extractable answer (counted as wrong)
    bad_reference: int       # references math-verify could not parse (counted as wrong)
    rows: list[dict]         # per problem: where, extracted, correct

    def to_dict(self) -> dict:
        return {"pass@1": self.accuracy, "correct": self.correct, "total": self.total,
                "no_answer": self.no_answer, "bad_reference": self.bad_reference}


def score(problems: list[MathProblem], responses: list[str]) -> MathResult:
    """Greedy pass@1 of the responses (one per problem, in order)."""
    checks = check_many(responses, [p.answer for p in problems])
    rows = [{"where": p.where, **c} for p, c in zip(problems, checks)]
    good = sum(c["correct"] for c in checks)
    return MathResult(good / max(len(checks), 1), good, len(checks), sum(c["extracted"] is None for c in checks),
                      sum(not c["reference_ok"] for c in checks), rows)


def prompt(problem: MathProblem, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user message for a problem: the question, then the instruction (if any)."""
    return f"{problem.question}\n{instruction}" if instruction else problem.question


if __name__ == "__main__":   # the worker of `check_many` off the main thread
    print(json.dumps(_check_all([tuple(p) for p in json.loads(sys.stdin.read())])))
