"""Epoch data: the warning when generation can outgrow the training response budget; sampled
token ids (given teacher responses, generated student responses) reach the training labels."""
import pytest

from distillm2_jax import config as config_lib
from distillm2_jax.train import epoch_data
from tests.tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401


def _data(tmp_path, max_new_tokens):
    cfg = config_lib.with_overrides(config_lib.Config(), [
        f"run_dir={tmp_path}", "data.prompts=prompts.jsonl", "data.max_length=48",
        "data.max_prompt_length=24", f"generation.max_new_tokens={max_new_tokens}"])
    logs = []
    return epoch_data.EpochData(cfg, tokenizer=None, log=logs.append), logs


def test_generation_longer_than_the_response_budget_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setattr(epoch_data, "generate_file", lambda *a, **k: None)
    data, logs = _data(tmp_path, max_new_tokens=24)        # 24 + end-of-turn > 48 - 24
    data._generate(None, tmp_path / "t.jsonl", seed=0, what="teacher")
    data._generate(None, tmp_path / "s.jsonl", seed=1, what="epoch 1 student")
    notes = [m for m in logs if m.startswith("note:")]
    assert len(notes) == 1 and "max_new_tokens=24" in notes[0] and "24 response tokens" in notes[0]
    data, logs = _data(tmp_path, max_new_tokens=23)        # fits exactly
    data._generate(None, tmp_path / "t.jsonl", seed=0, what="teacher")
    assert not [m for m in logs if m.startswith("note:")]


# ----------------------------------------------------------------------------- token-exact responses

def _non_canonical(tok, text):
    """`text`'s ids with its first splittable token split in two vocabulary tokens."""
    vocab, ids = tok.get_vocab(), tok(text, add_special_tokens=False)["input_ids"]
    for j, i in enumerate(ids):
        t = tok.convert_ids_to_tokens(i)
        for k in range(1, len(t)):
            if t[:k] in vocab and t[k:] in vocab:
                out = ids[:j] + [vocab[t[:k]], vocab[t[k:]]] + ids[j + 1:]
                assert tok.decode(out) == text and out != ids
                return out
    raise AssertionError(f"nothing to split in {text!r}")


def _forced_sampler(tok, responses):
    """An `iter_sample` that 'samples' the given id lists (then EOS) for the prompts in order."""
    from distillm2_jax.generation import FINISH_STOP, Result
    from tests.tiny_tokenizer import EOS_ID

    def iter_sample(model, prompt_ids, *, start_row=0, **_):
        rows = list(range(start_row, len(prompt_ids)))
        yield rows, [Result(responses[r] + [EOS_ID], FINISH_STOP, len(prompt_ids[r]), len(responses[r]) + 1)
                     for r in rows]
    return iter_sample


def test_teacher_responses_and_generated_student_ids_reach_the_training_labels(
        tmp_path, monkeypatch, tiny_tokenizer):  # noqa: F811
    import json

    import numpy as np

    from distillm2_jax.data.generations import make_generation_record, tokenizer_fingerprint
    from distillm2_jax.errors import UserError
    from distillm2_jax.generation import driver
    from distillm2_jax.models.config import ModelConfig
    from tests.tiny_tokenizer import EOS_ID

    tok = tiny_tokenizer
    prompts = ["Write a short poem about the sea.", "Name a colour."]
    teacher_text = ["The teacher answers with a short poem about the sea.", "The sea is blue."]
    student_text = ["The student writes about the sea.", "Red, I think."]
    t_ids = [_non_canonical(tok, t) for t in teacher_text]
    s_ids = [_non_canonical(tok, t) for t in student_text]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    teacher_file = tmp_path / "teacher.jsonl"   # precomputed teacher generations (data.teacher_responses)
    teacher_file.write_text("".join(json.dumps(make_generation_record(
        id=str(i), prompt=p, response=t, finish_reason="stop", prompt_tokens=9, response_tokens=len(ids) + 1,
        response_ids=ids, tokenizer=tokenizer_fingerprint(tok))) + "\n"
        for i, (p, t, ids) in enumerate(zip(prompts, teacher_text, t_ids))))
    cfg = config_lib.with_overrides(config_lib.Config(), [
        f"run_dir={tmp_path / 'run'}", f"data.prompts={tmp_path / 'prompts.jsonl'}",
        f"data.teacher_responses={teacher_file}", "data.max_length=96", "data.max_prompt_length=48",
        "generation.max_new_tokens=40", "train.global_batch=2"])
    monkeypatch.setattr(driver, "iter_sample", _forced_sampler(tok, s_ids))
    student = ({"embed": np.zeros((1, 1), np.float32)},   # never run: the sampler is forced
               ModelConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=1, intermediate_size=1,
                           num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, rms_norm_eps=1e-6,
                           rope_theta=1e4))
    logs = []
    data = epoch_data.EpochData(cfg, tok, log=logs.append)
    pairs = data.pairs_for_epoch(0, teacher=None, student=student)
    gen = [json.loads(line) for line in (tmp_path / "run" / "data" / "student_epoch1.jsonl").open()]
    assert [g["response_ids"] for g in gen] == s_ids and [g["response"] for g in gen] == student_text
    assert any("4 responses from their sampled token ids" in m for m in logs)
    batch = next(iter(epoch_data.make_loader(cfg, pairs, tok, 0)))
    got = {}
    for i in range(2):
        for half, name in ((0, "chosen"), (1, "rejected")):
            labels = batch["labels"][i, half]
            got.setdefault(name, []).append(labels[labels != -100].tolist())
    assert sorted(got["chosen"]) == sorted(ids + [EOS_ID] for ids in t_ids)      # the loader shuffles
    assert sorted(got["rejected"]) == sorted(ids + [EOS_ID] for ids in s_ids)
    canonical = [tok(t, add_special_tokens=False)["input_ids"] + [EOS_ID] for t in student_text]
    assert not set(map(tuple, canonical)) & set(map(tuple, got["rejected"]))

    # ids that do not decode to their text: stopped when the epoch's pairs are read, naming file:line
    lines = teacher_file.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["response"] = "The sky is blue."
    teacher_file.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    data = epoch_data.EpochData(cfg, tok, log=logs.append)
    (tmp_path / "run" / "data" / "pairs_epoch1.jsonl").unlink()
    with pytest.raises(UserError, match=r"pairs_epoch1.jsonl:2: field `chosen_ids` does not decode"):
        data.pairs_for_epoch(0, teacher=None, student=student)


@pytest.mark.parametrize("objective", ["kd", "seqkd"])
def test_teacher_only_objectives_sample_no_student_responses(tmp_path, monkeypatch, objective, tiny_tokenizer):  # noqa: F811
    """KD and SeqKD never read the student rows: no student sampling in any epoch."""
    import json

    from distillm2_jax.data.generations import make_generation_record
    from distillm2_jax.generation import driver

    prompts = ["Write a short poem about the sea.", "Name a colour."]
    teacher_file = tmp_path / "teacher.jsonl"
    teacher_file.write_text("".join(json.dumps(make_generation_record(
        id=str(i), prompt=p, response=f"answer {i}", finish_reason="stop", prompt_tokens=9,
        response_tokens=3)) + "\n" for i, p in enumerate(prompts)))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = config_lib.with_overrides(config_lib.Config(), [
        f"run_dir={tmp_path / 'run'}", f"data.prompts={tmp_path / 'prompts.jsonl'}",
        f"data.teacher_responses={teacher_file}", f"objective.name={objective}",
        "data.max_length=96", "data.max_prompt_length=48", "generation.max_new_tokens=40"])

    def no_sampling(*a, **k):
        raise AssertionError("sampled student responses for an objective that never reads them")

    monkeypatch.setattr(driver, "iter_sample", no_sampling)
    logs = []
    data = epoch_data.EpochData(cfg, tiny_tokenizer, log=logs.append)
    for epoch in range(2):
        pairs = data.pairs_for_epoch(epoch, teacher=None, student=object())
        assert sorted(p.chosen for p in pairs) == ["answer 0", "answer 1"]
        assert all(p.rejected == p.chosen for p in pairs)
    assert not list((tmp_path / "run" / "data").glob("student_epoch*.jsonl"))
    assert any("no student responses are sampled" in m for m in logs)
