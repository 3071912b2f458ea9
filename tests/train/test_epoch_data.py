"""Epoch data: the warning when generation can outgrow the training response budget."""
from distillm2_jax import config as config_lib
from distillm2_jax.train import epoch_data


def _data(tmp_path, max_new_tokens):
    cfg = config_lib.with_overrides(config_lib.Config(), [
        f"run_dir={tmp_path}", "data.prompts=prompts.jsonl", "data.max_length=48",
        "data.max_prompt_length=24", f"generation.max_new_tokens={max_new_tokens}"])
    logs = []
    return epoch_data.EpochData(cfg, tokenizer=None, log=logs.append), logs


def test_generation_longer_than_the_response_budget_is_reported_once(tmp_path, monkeypatch):
    import distillm2_jax.generate

    monkeypatch.setattr(distillm2_jax.generate, "generate_file", lambda *a, **k: None)
    data, logs = _data(tmp_path, max_new_tokens=24)        # 24 + end-of-turn > 48 - 24
    data._generate(None, tmp_path / "t.jsonl", seed=0, what="teacher")
    data._generate(None, tmp_path / "s.jsonl", seed=1, what="epoch 1 student")
    notes = [m for m in logs if m.startswith("note:")]
    assert len(notes) == 1 and "max_new_tokens=24" in notes[0] and "24 response tokens" in notes[0]
    data, logs = _data(tmp_path, max_new_tokens=23)        # fits exactly
    data._generate(None, tmp_path / "t.jsonl", seed=0, what="teacher")
    assert not [m for m in logs if m.startswith("note:")]
