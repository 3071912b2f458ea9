"""`distillm2 demo --quick` end to end, and every artefact it promises (docs/demo.md)."""
import json

import numpy as np
import pytest

from distillm2_jax import api, cli
from distillm2_jax.demo import assets


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_packaged_teacher_is_small_and_complete():
    assert assets.has_packaged_teacher()
    size = sum(f.stat().st_size for f in assets.TEACHER_DIR.iterdir() if f.is_file())
    assert size <= 20 * 2**20
    tok = api.load_tokenizer(str(assets.TEACHER_DIR))
    assert len(tok) == assets.VOCAB_SIZE and tok.eos_token_id == assets.EOS_ID


def test_demo_writes_pairs_of_each_epoch(demo_out):
    data = demo_out / "runs" / "distillm2" / "data"
    for epoch in (1, 2):
        rows = [json.loads(line) for line in open(data / f"pairs_epoch{epoch}.jsonl")]
        assert len(rows) == 64
        assert rows[0]["chosen"][-1]["role"] == "assistant" and rows[0]["rejected"][-1]["role"] == "assistant"
        # the sampled token ids travel with the text (training uses them, not a re-encoding)
        assert all(isinstance(r["chosen_ids"], list) and isinstance(r["rejected_ids"], list) for r in rows)
    # the student's responses were regenerated for epoch 2 (a different sampling key)
    e1 = [json.loads(line)["response"] for line in open(data / "student_epoch1.jsonl")]
    e2 = [json.loads(line)["response"] for line in open(data / "student_epoch2.jsonl")]
    assert e1 != e2


def test_demo_checkpoints_and_metrics(demo_out):
    run = demo_out / "runs" / "distillm2"
    assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) == 8
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["epoch"] == 2 and records[-1]["ref_gap"] > 0      # curriculum on in epoch 2
    assert records[-1]["beta"] > records[0]["beta"]                      # b rises in the last epoch


def test_demo_export_loads_in_transformers_with_matching_logits(demo_out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = demo_out / "student_distillm2"
    hf = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    ids = tok.apply_chat_template([{"role": "user", "content": "Add: 4785 + 0936"}], add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits.numpy()
    want = np.asarray(api.restore_student(demo_out / "runs" / "distillm2")(np.asarray([ids])))
    np.testing.assert_allclose(got, want, atol=1e-4)
    results = json.loads((demo_out / "results.json").read_text())
    assert results["export"]["transformers_max_abs_logit_diff"] < 1e-4


def test_demo_results_table_and_curves(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = results["rows"]
    assert list(rows) == ["teacher", "student (warm-up only)", "student after DistiLLM-2", "student after KD"]
    heldout = len((demo_out / "data" / "heldout.jsonl").read_text().splitlines())
    for name, row in rows.items():
        # exact match is a count of held-out prompts; NLL is over every held-out response token
        assert round(row["exact_match"] * heldout, 6) == round(row["exact_match"] * heldout)
        assert np.isfinite(row["nll"]) and row["tokens"] == rows["teacher"]["tokens"] > 0
        if name != "teacher":
            assert 0.0 < row["acceptance"] < 1.0   # a student is not the teacher
    # the packaged teacher knows the task: most held-out answers are right
    assert rows["teacher"]["exact_match"] >= 0.8
    text = (demo_out / "results.md").read_text()
    assert "student after DistiLLM-2" in text and "exact match" in text
    png = (demo_out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_refuses_to_overwrite_silently(demo_out, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(demo_out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("precious")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "not a demo output folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"
