"""End to end on tiny random models: a local judge (its verdicts are garbage: all counted as
unparseable) and `distillm2 eval` writing one report with every protocol's metric."""
import json

import pytest

from distillm2_jax import api
from distillm2_jax.cli import main
from distillm2_jax.protocols import judge, report
from distillm2_jax.protocols.judge_backends import LocalJudge
from tests.tiny_run import build_tiny_run


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("tiny"), num_prompts=2)


@pytest.mark.slow   # the fast path through the local judge is the eval test below
def test_local_model_judge_counts_garbage_as_unparseable(paths):
    tok = api.load_tokenizer(str(paths["teacher"]))
    # the eval test below decodes the same shapes (prompt bucket 32, 16 slots): one compilation
    local = LocalJudge(api.from_pretrained(paths["teacher"]), tok, max_new_tokens=4, max_prompt_length=24, seed=1)
    items = [judge.Item(f"red cat {i}", f"blue dog {i}", f"sum two {i}", f"r:{i}") for i in range(3)]
    res, rows = judge.run(local, items)
    texts = [r[k] for r in rows for k in ("judgment_student_first", "judgment_student_second")]
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    expected = sum(judge.parse_verdict(t) is None for t in texts)
    assert res.unparseable == expected == 6 and res.n == 0    # a random model writes no [[A]]
    assert local.truncated == 6     # the judge prompt is longer than 24 tokens: counted


def test_eval_writes_one_report_with_every_protocol(paths, tmp_path, capsys):
    math_file = _jsonl(tmp_path / "gsm.jsonl", [{"question": "two plus three", "answer": "2+3=5\n#### 5"},
                                                {"question": "red", "answer": "\\frac{1}{2}"}])
    code_file = _jsonl(tmp_path / "code.jsonl", [
        {"task_id": "t/0", "prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 1\n",
         "entry_point": "f"}])
    refs = _jsonl(tmp_path / "refs.jsonl", [{"instruction": "red cat", "output": "blue dog"}])
    out_dir = tmp_path / "report"
    argv = ["eval", "--model", str(paths["student"]), "--data", str(paths["pairs"]), "--math", str(math_file),
            "--code", str(code_file), "--judge-references", str(refs), "--judge", str(paths["teacher"]),
            "--judge-max-new-tokens", "4", "--judge-max-prompt-length", "24", "--max-new-tokens", "4",
            "--max-length", "48", "--max-prompt-length", "24", "--samples", "0", "--code-timeout", "2",
            "--report", str(out_dir), "--out", str(tmp_path / "e.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out_dir / "report.json").read_text())
    assert set(rep["metrics"]) == {"win_rate", "math_pass@1", "code_pass@1", "nll"}
    assert rep["metrics"]["math_pass@1"]["total"] == 2 and rep["metrics"]["code_pass@1"]["problems"] == 1
    assert rep["metrics"]["win_rate"]["questions"] == 1 and rep["metrics"]["win_rate"]["unparseable"] == 2
    assert len(rep["details"]["judgments"]) == 1 and len(rep["details"]["code"]) == 1
    # the tiny random judge writes no verdict token: both of its judgments are counted as unparseable
    row = rep["details"]["judgments"][0]
    assert judge.parse_verdict(row["judgment_student_first"]) is None is row["outcome_student_first"]
    assert judge.parse_verdict(row["judgment_student_second"]) is None is row["outcome_student_second"]
    md = (out_dir / "report.md").read_text()
    assert md == report.markdown(rep) and md in printed
    for row in ("win rate (%)", "math pass@1 (%)", "code pass@1 (%)", "NLL of reference responses"):
        assert row in md
    assert "judge" in json.loads((tmp_path / "e.json").read_text())


def test_markdown_and_comparison_of_built_reports():
    result = {"judge": {"file": "refs.json", "judge": "j", "win_rate": 0.625, "low": 0.5, "high": 0.75, "wins": 4,
                        "ties": 2, "losses": 2, "n": 8, "unparseable": 0, "questions": 4, "flip_rate": 0.25,
                        "first_position_rate": 0.5, "by_order": {}, "judgments": [{"where": "r:1"}]},
              "math": {"file": "gsm.jsonl", "pass@1": 0.5, "correct": 1, "total": 2, "no_answer": 1,
                       "bad_reference": 0, "rows": [{}, {}]},
              "nll": {"nll": 1.25, "perplexity": 3.49, "tokens": 10, "sequences": 2}}
    rep = report.build("student-a", result)
    assert set(rep["metrics"]) == {"win_rate", "math_pass@1", "nll"} and len(rep["details"]["math"]) == 2
    md = report.markdown(rep)
    assert "| win rate (%) ↑ | 62.50 [50.00, 75.00] |" in md and "| math pass@1 (%) ↑ | 50.00 |" in md
    other = report.build("student-b", {"nll": {**result["nll"], "nll": 2.0}})
    table = report.comparison_markdown([rep, other]).splitlines()
    assert table[0] == "| student | win rate (%) ↑ | math pass@1 (%) ↑ | NLL ↓ |"
    assert table[2:] == ["| student-a | 62.50 | 50.00 | 1.2500 |", "| student-b | — | — | 2.0000 |"]


def test_eval_protocol_flags_fail_fast_with_one_line(capsys):
    for argv, message in ((["--judge-references", "r.json"], "needs a judge"),
                          (["--math", "m.jsonl", "--judge", "j"], "need --judge-references"),
                          (["--judge-references", "r.json", "--judge-url", "http://h"], "needs --judge-model"),
                          (["--code", "c.jsonl", "--code-timeout", "0"], "--code-timeout must be positive"),
                          ([], "nothing to evaluate")):
        assert main(["eval", "--model", "/no/such/model", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
