"""pass@k against the estimator written with binomials; HumanEval / MBPP programs; `eval-code`."""
import json
from math import comb

import pytest

from distillm2_jax.cli import main
from distillm2_jax.protocols import code
from distillm2_jax.protocols.sandbox import Limits


def _by_hand(n, c, k):
    return 1.0 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (10, 0, 10),
                                   (10, 10, 1), (20, 13, 10), (200, 1, 100), (6, 4, 3), (6, 4, 5)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert code.pass_at_k(n, c, k) == pytest.approx(_by_hand(n, c, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_when_fewer_wrong_than_k_is_one():
    assert code.pass_at_k(6, 4, 3) == 1.0 == _by_hand(6, 4, 3)   # n - c = 2 < k = 3
    assert code.pass_at_k(5, 0, 1) == 0.0
    with pytest.raises(ValueError):
        code.pass_at_k(3, 1, 4)


def test_pass_at_k_is_stable_for_large_n():
    # the binomials are ~1e299 here; the product form has no trouble
    assert code.pass_at_k(1000, 1, 500) == pytest.approx(0.5)


HUMANEVAL = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
MBPP = {"task_id": 7, "text": "Write a function to double a number.", "test_setup_code": "",
        "test_list": ["assert double(2) == 4", "assert double(0) == 0"], "code": "unused"}


def test_humaneval_and_mbpp_programs_score(tmp_path):
    problems = {p.task_id: p for p in (code.parse_problem(HUMANEVAL, "p:1"), code.parse_problem(MBPP, "p:2"))}
    samples = [code.parse_sample(s, f"s:{i}") for i, s in enumerate([
        {"task_id": "t/0", "completion": "    return a + b\n"},
        {"task_id": "t/0", "completion": "    return a - b\n"},
        {"task_id": "t/0", "solution": "def add(a, b):\n    return b + a\n"},
        {"task_id": 7, "completion": "def double(x):\n    return 2 * x\n"},
        {"task_id": 7, "completion": "def double(x):\n    while True:\n        pass\n"},
    ])]
    res = code.score(problems, samples, limits=Limits(timeout=5.0), workers=2, ks=(1, 2, 3))
    assert [r["result"] for r in res.results] == ["passed", "failed", "passed", "passed", "timeout"]
    # per task: t/0 n=3 c=2, 7: n=2 c=1
    assert res.pass_at["pass@1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert res.pass_at["pass@2"] == pytest.approx((_by_hand(3, 2, 2) + _by_hand(2, 1, 2)) / 2)
    assert res.pass_at["pass@3"] == pytest.approx(_by_hand(3, 2, 3)) and res.problems_per_k["pass@3"] == 1


def test_a_chat_response_becomes_a_sample():
    he = code.parse_problem(HUMANEVAL, "p:1")
    whole = code.sample_from_response(he, "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    assert whole.whole_program and "def add(a, b):\n    return a + b" in code.program(he, whole)
    body = code.sample_from_response(he, "```\n    return a + b\n```")
    assert not body.whole_program and code.program(he, body).startswith(HUMANEVAL["prompt"] + "    return a + b")
    mb = code.parse_problem(MBPP, "p:2")
    assert "assert double(2) == 4" in code.instruction(mb)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_code_cli_writes_results_and_prints_pass_at_k(tmp_path, capsys):
    problems = _write(tmp_path / "problems.jsonl", [HUMANEVAL, MBPP])
    samples = _write(tmp_path / "samples.jsonl", [
        {"task_id": "t/0", "completion": "    return a + b\n"},
        {"task_id": "t/0", "completion": "    return [0] * 10 ** 10\n"},
        {"task_id": 7, "completion": "def double(x):\n    return x + x\n"},
        {"task_id": 7, "completion": "def double(x):\n    return x\n"},
    ])
    out = tmp_path / "results.jsonl"
    assert main(["eval-code", "--problems", str(problems), "--samples", str(samples), "--timeout", "10",
                 "--memory-mb", "256", "--workers", "2", "--k", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pass@1: 0.5000 over 2 problems" in printed and "pass@2: 1.0000 over 2 problems" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["passed"], r["result"]) for r in rows] == [
        ("t/0", True, "passed"), ("t/0", False, "memory"), ("7", True, "passed"), ("7", False, "failed")]


def test_eval_code_bad_jsonl_names_the_file_and_line(tmp_path, capsys):
    problems = _write(tmp_path / "problems.jsonl", [HUMANEVAL])
    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps({"task_id": "t/0", "completion": "x"}) + "\n{not json\n")
    assert main(["eval-code", "--problems", str(problems), "--samples", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2" in err and "invalid JSON" in err and "\n" not in err

    unknown = _write(tmp_path / "unknown.jsonl", [{"task_id": "t/9", "completion": "x"}])
    assert main(["eval-code", "--problems", str(problems), "--samples", str(unknown)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{unknown}:1" in err and "t/9" in err and "\n" not in err

    no_test = _write(tmp_path / "p2.jsonl", [{"task_id": "x", "prompt": "def f(): pass"}])
    assert main(["eval-code", "--problems", str(no_test), "--samples", str(unknown)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{no_test}:1" in err and "\n" not in err
