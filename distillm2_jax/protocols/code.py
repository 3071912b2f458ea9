"""Code pass@1 / pass@k on HumanEval- and MBPP-format problems, every candidate run in `sandbox`.

Problems (one record each, `task_id` a string or integer):

* HumanEval format (also EvalPlus HumanEval+ / MBPP+): `prompt` (signature + docstring),
  `test` (defines `check(candidate)`), `entry_point` (the function's name);
* original MBPP format: `text` (the task), `test_list` (assert lines), optional `test_setup_code`.

Samples: `task_id` and either `completion` (appended to the HumanEval prompt, as human-eval
expects) or `solution` (a whole program, as EvalPlus writes). For MBPP both are the whole program.

pass@k is the unbiased estimator of Chen et al. (2021) over n samples with c correct:
1 - C(n - c, k) / C(n, k), averaged over problems (problems with fewer than k samples are
left out of pass@k and counted).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from distillm2_jax.errors import UserError
from distillm2_jax.protocols import fields
from distillm2_jax.protocols.sandbox import STATUSES, Limits, Outcome, run_programs


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str            # HumanEval: the code to complete; MBPP: the task text
    test: str              # HumanEval: the `check` function; MBPP: setup code + the assert lines
    entry_point: str | None  # None for MBPP-format problems
    where: str

    @property
    def is_humaneval(self) -> bool:
        return self.entry_point is not None


@dataclasses.dataclass(frozen=True)
class Sample:
    task_id: str
    code: str
    whole_program: bool   # `solution` (or any MBPP sample): not appended to the prompt
    where: str


def parse_problem(data: dict, where: str) -> Problem:
    tid = fields.task_id(data, where)
    if "entry_point" in data or "test" in data:
        entry = fields.text(data, ("entry_point",), where)
        if not entry.isidentifier():
            raise UserError(f"{where}: field `entry_point`: {entry!r} is not a Python name")
        return Problem(tid, fields.text(data, ("prompt",), where), fields.text(data, ("test",), where), entry, where)
    tests = data.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise UserError(f"{where}: a problem needs `prompt`, `test` and `entry_point` (HumanEval format) "
                        "or `text` and `test_list`, a list of assert lines (MBPP format)")
    setup = fields.text(data, ("test_setup_code",), where, required=False) or ""
    return Problem(tid, fields.text(data, ("text", "prompt"), where), setup + "\n" + "\n".join(tests), None, where)


def read_problems(spec: str) -> dict[str, Problem]:
    """task_id -> Problem; a repeated task_id is an error naming both places."""
    out: dict[str, Problem] = {}
    for where, data in fields.read_all(spec, "code problems"):
        p = parse_problem(data, where)
        if p.task_id in out:
            raise UserError(f"{where}: task_id {p.task_id!r} repeats {out[p.task_id].where}")
        out[p.task_id] = p
    return out


def parse_sample(data: dict, where: str) -> Sample:
    tid = fields.task_id(data, where)
    if "solution" in data:
        return Sample(tid, fields.text(data, ("solution",), where), True, where)
    return Sample(tid, fields.text(data, ("completion",), where), False, where)


def read_samples(spec: str, problems: dict[str, Problem]) -> list[Sample]:
    """Every sample, in file order; a task_id with no problem is an error naming the line."""
    out = []
    for where, data in fields.read_all(spec, "code samples"):
        s = parse_sample(data, where)
        if s.task_id not in problems:
            raise UserError(f"{where}: task_id {s.task_id!r} is not among the problems")
        out.append(s)
    return out


def program(problem: Problem, sample: Sample) -> str:
    """The program the sandbox runs: the candidate, then the tests (and `check(entry_point)`)."""
    if not problem.is_humaneval:
        return f"{sample.code}\n\n{problem.test}\n"
    code = sample.code if sample.whole_program else problem.prompt + sample.code
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def sample_from_response(problem: Problem, response: str, where: str = "") -> Sample:
    """A chat model's response as a sample: the first fenced code block (else the whole text);
    for HumanEval, a block that defines the entry point is put after the prompt (which keeps
    the prompt's imports; the later definition wins), otherwise it is the function's body."""
    m = _FENCE.search(response)
    code = m.group(1) if m else response
    if not problem.is_humaneval:
        return Sample(problem.task_id, code, True, where)
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return Sample(problem.task_id, problem.prompt + "\n" + code, True, where)
    return Sample(problem.task_id, code, False, where)


def instruction(problem: Problem) -> str:
    """The user message that asks a chat model for a solution."""
    if problem.is_humaneval:
        return ("Complete the following Python function. Reply with the complete function in one "
                f"```python code block.\n\n```python\n{problem.prompt}```")
    tests = problem.test.strip()
    return (f"Write a Python function for this task: {problem.prompt}\nIt must pass these tests:\n\n"
            f"```python\n{tests}\n```\n\nReply with the code in one ```python code block.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1..n} (1 - k / i), which never forms the huge binomials."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """One result per sample (file order), pass@k per k, and the counts of each status."""
    results: list[dict]
    pass_at: dict[str, float]          # "pass@1" -> value, for every k that some problem allows
    problems_per_k: dict[str, int]     # problems with at least k samples (those pass@k averages)
    statuses: dict[str, int]
    problems: int                      # problems with at least one sample

    def to_dict(self) -> dict:
        return {"pass_at": self.pass_at, "problems_per_k": self.problems_per_k, "statuses": self.statuses,
                "problems": self.problems, "samples": len(self.results)}


def score(problems: dict[str, Problem], samples: list[Sample], *, limits: Limits = Limits(), workers: int = 1,
          ks=(1, 10, 100)) -> CodeResult:
    """Run every sample's program and compute pass@k for each k in `ks`."""
    outcomes: list[Outcome] = run_programs([program(problems[s.task_id], s) for s in samples], limits,
                                           workers=workers)
    results, per_task = [], {}
    for s, o in zip(samples, outcomes):
        results.append({"task_id": s.task_id, "passed": o.passed, "result": o.status, "detail": o.detail,
                        "seconds": round(o.seconds, 3)})
        n, c = per_task.get(s.task_id, (0, 0))
        per_task[s.task_id] = (n + 1, c + int(o.passed))
    pass_at, counts = {}, {}
    for k in ks:
        vals = [pass_at_k(n, c, k) for n, c in per_task.values() if n >= k]
        if vals:
            pass_at[f"pass@{k}"] = float(np.mean(vals))
            counts[f"pass@{k}"] = len(vals)
    statuses = {st: sum(r["result"] == st for r in results) for st in STATUSES}
    return CodeResult(results, pass_at, counts, statuses, len(per_task))


def format_result(res: CodeResult) -> str:
    """Printed summary: pass@k lines and the status counts."""
    lines = [f"{k}: {v:.4f} over {res.problems_per_k[k]} problems" for k, v in res.pass_at.items()]
    lines.append("results: " + ", ".join(f"{n} {st}" for st, n in res.statuses.items()))
    return "\n".join(lines)
