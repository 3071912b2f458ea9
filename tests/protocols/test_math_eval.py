"""The math check (math-verify) on right, wrong and malformed answers, GSM8K and MATH references."""
import json
import threading

import pytest

from distillm2_jax.errors import UserError
from distillm2_jax.protocols import math_eval

# (response, reference as stored in the file, correct?)
TABLE = [
    # GSM8K: the reference is a rationale ending in `#### N`
    ("She sells 48 / 2 = 24 clips, 72 in all. #### 72", "48/2 = 24 clips in May.\n#### 72", True),
    ("The answer is: 72", "Natalia sold 48+24 = 72 clips.\n#### 72", True),
    ("#### 1,234", "#### 1234", True),
    ("#### 71", "#### 72", False),
    ("The total is \\boxed{72}", "#### 72", True),
    # MATH: a solution with \boxed{} or a bare LaTeX answer
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "Hence the probability is $\\boxed{\\frac12}$.", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", True),                  # sets: order does not matter
    ("\\boxed{\\{1, 3\\}}", "\\{1, 2\\}", False),
    ("\\boxed{(1, 2]}", "(1, 2]", True),                          # intervals: brackets matter
    ("\\boxed{[1, 2]}", "(1, 2]", False),
    ("\\boxed{72\\text{ dollars}}", "72", True),                  # units
    ("\\boxed{10\\%}", "10\\%", True),
    ("\\boxed{\\sqrt{18}}", "3\\sqrt{2}", True),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
    ("\\boxed{x^2 + 1}", "(x+1)^2", False),
    # malformed: no answer to extract
    ("I am not sure.", "72", False),
    ("", "#### 5", False),
    ("\\boxed{72", "72", False),
    ("#### ", "#### 5", False),
]


def test_the_table():
    checks = math_eval.check_many([r for r, _, _ in TABLE], [a for _, a, _ in TABLE])
    assert [c["correct"] for c in checks] == [ok for _, _, ok in TABLE]
    assert all(c["reference_ok"] for c in checks)
    malformed = [c["extracted"] is None for c in checks]
    assert malformed == [False] * 18 + [True] * 4


def test_off_the_main_thread_the_library_timeouts_still_work():
    """math-verify's signal timeouts need the main thread: elsewhere the check moves to a child process."""
    got = {}
    t = threading.Thread(target=lambda: got.update(v=math_eval.check_many(["#### 72", "\\boxed{3}"], ["72", "4"])))
    t.start()
    t.join()
    assert [c["correct"] for c in got["v"]] == [True, False]


def test_score_counts_and_reading(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "2+3?", "answer": "2+3=5\n#### 5"}, {"problem": "half of 1?", "solution": "$\\boxed{1/2}$"},
        {"question": "7*6?", "answer": 42}]))
    problems = math_eval.read_problems(str(f))
    assert [p.answer for p in problems][2] == "42"
    assert "\\boxed{}" in math_eval.prompt(problems[0])
    res = math_eval.score(problems, ["so #### 5", "it is 0.5", "no idea"])
    assert (res.correct, res.total, res.no_answer, res.bad_reference) == (2, 3, 1, 0)
    assert res.accuracy == pytest.approx(2 / 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=f"{bad}:1: missing field `answer` or `solution`"):
        math_eval.read_problems(str(bad))
