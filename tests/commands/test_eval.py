"""`distillm2 eval`: metrics from pair / generation / answer records, samples, and clear errors."""
import json

import numpy as np

from distillm2_jax import answers, api
from distillm2_jax.cli import main
from distillm2_jax.data.eval_records import read_eval_records
from tests.tiny_run import build_tiny_run


def _records(paths, tmp_path):
    pairs = [json.loads(line) for line in open(paths["pairs"])]
    out = tmp_path / "heldout.jsonl"
    with open(out, "w") as f:
        for p in pairs[:3]:
            f.write(json.dumps({**p, "answer": "red"}) + "\n")               # pair + answer
        f.write(json.dumps({"prompt": pairs[3]["prompt"], "response": "blue cat"}) + "\n")   # generation
        f.write(json.dumps({"prompt": pairs[4]["prompt"], "answer": 7}) + "\n")              # prompt + answer
    return out


def test_eval_reports_every_metric(tmp_path, capsys):
    paths = build_tiny_run(tmp_path, num_prompts=5)
    data = _records(paths, tmp_path)
    out_json = tmp_path / "eval.json"
    argv = ["eval", "--model", str(paths["student"]), "--data", str(data), "--teacher", str(paths["teacher"]),
            "--max-new-tokens", "4", "--max-length", "48", "--max-prompt-length", "24", "--samples", "2",
            "--out", str(out_json)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "NLL of reference responses" in printed and "acceptance rate" in printed and "exact match" in printed
    result = json.loads(out_json.read_text())
    assert result["records"] == 5
    assert result["exact_match"]["total"] == 4
    # the count equals the greedy responses checked one by one with the generic extractor
    tok = api.load_tokenizer(str(paths["teacher"]))
    recs = [r for r in read_eval_records(str(data)) if r.answer is not None]
    responses = api.respond(api.from_pretrained(paths["student"]), [r.messages for r in recs], tok,
                            max_new_tokens=4, max_prompt_length=24)
    assert result["exact_match"]["correct"] == sum(answers.exact_match(x, r.answer) for x, r in zip(responses, recs))
    assert len(result["samples"]) == 2 and "answer" in result["samples"][0]

    # NLL and acceptance are over the 4 records with a reference response, as the API computes them
    with_resp = [r.as_pair() for r in read_eval_records(str(data)) if r.response is not None]
    assert len(with_resp) == 4
    kw = dict(max_length=48, max_prompt_length=24)
    student, teacher = api.from_pretrained(paths["student"]), api.from_pretrained(paths["teacher"])
    np.testing.assert_allclose(result["nll"]["nll"], api.nll(student, with_resp, tok, **kw).nll, rtol=1e-6)
    np.testing.assert_allclose(result["acceptance"]["rate"],
                               api.acceptance_rate(student, teacher, with_resp, tok, **kw).rate, rtol=1e-6)


def test_eval_bad_record_names_file_and_line(tmp_path, capsys):
    paths = build_tiny_run(tmp_path, num_prompts=2)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps({"prompt": "x", "answer": [1]}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(paths["student"]), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:2" in err and "answer" in err and "\n" not in err


def test_eval_teacher_needs_reference_responses(tmp_path, capsys):
    paths = build_tiny_run(tmp_path, num_prompts=2)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "red cat", "answer": "1"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(paths["student"]), "--data", str(data), "--teacher",
                 str(paths["teacher"])]) == 2
    assert "reference response" in capsys.readouterr().err


def test_eval_records_fields_and_limit(tmp_path):
    from distillm2_jax.errors import UserError
    import pytest

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "a", "answer": 72.0}) + "\n"
                    + json.dumps({"prompt": "b", "answer": 2.5}) + "\n")
    assert [r.answer for r in read_eval_records(str(data))] == ["72", "2.5"]
    assert len(read_eval_records(str(data), limit=1)) == 1
    with pytest.raises(UserError, match="--limit must be at least 1"):
        read_eval_records(str(data), limit=0)
    data.write_text(json.dumps({"prompt": "a", "generated_text": 5}) + "\n")
    with pytest.raises(UserError, match=r"r.jsonl:1: field `generated_text`"):
        read_eval_records(str(data))
