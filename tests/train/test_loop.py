"""The trainer: mesh equivalence, curriculum and b schedule, resume after kill/preemption, LoRA export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from distillm2_jax import config as config_lib
from distillm2_jax.objectives import curriculum
from distillm2_jax.errors import UserError
from distillm2_jax.train.checkpoint import Checkpointer
from distillm2_jax.train.export import export_run, restore_student
from distillm2_jax.train.loop import train
from tests.tiny_run import build_tiny_run, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("tiny"), num_prompts=16)


def _params(run_dir):
    return jax.tree.map(np.asarray, restore_student(run_dir).params())


def _assert_params_close(a, b, atol):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_same_trajectory_on_every_mesh(tiny, tmp_path):
    common = {"train.epochs": 1, "train.micro_batch": 8}
    ref = train(tiny_config(tiny, tmp_path / "ref", **common, **{"mesh.shape": "[1,1,1]"}))
    ref_losses = [h["loss"] for h in ref.history]
    assert len(ref_losses) == 2 and ref_losses[1] < ref_losses[0]
    for shape in ("[8,1,1]", "[2,2,2]", "[1,2,4]"):
        run = train(tiny_config(tiny, tmp_path / shape, **common, **{"mesh.shape": shape}))
        np.testing.assert_allclose([h["loss"] for h in run.history], ref_losses, rtol=2e-5, err_msg=shape)
        np.testing.assert_allclose([h["grad_norm"] for h in run.history],
                                   [h["grad_norm"] for h in ref.history], rtol=1e-4, err_msg=shape)


def test_algorithm1_regenerates_and_turns_curriculum_on_from_epoch_two(tiny, tmp_path):
    """Teacher responses generated once, student responses regenerated each epoch from the
    current student, m measured at epoch 2, per-row a from then on, b on the paper schedule."""
    run = train(tiny_config(tiny, tmp_path / "run", **{"objective.beta_schedule": "paper", "data.pairs": "null",
                                                        "generation.regenerate_student": "true"}))
    data = tmp_path / "run" / "data"
    assert sorted(p.name for p in data.glob("*.jsonl")) == [
        "pairs_epoch1.jsonl", "pairs_epoch2.jsonl", "student_epoch1.jsonl", "student_epoch2.jsonl", "teacher.jsonl"]
    epoch1 = [json.loads(x)["response"] for x in (data / "student_epoch1.jsonl").read_text().splitlines()]
    epoch2 = [json.loads(x)["response"] for x in (data / "student_epoch2.jsonl").read_text().splitlines()]
    assert len(epoch1) == len(epoch2) == 16 and epoch1 != epoch2  # sampled again from the trained student
    hist = run.history
    assert [h["epoch"] for h in hist] == [1, 1, 2, 2]
    for h in hist[:2]:  # epoch 1: fixed a0
        assert h["alpha_min"] == h["alpha_max"] == pytest.approx(0.1)
    for h in hist[2:]:  # epoch 2: per-sample a in [a_min, a0], varying across rows
        assert 0.01 - 1e-7 <= h["alpha_min"] < h["alpha_max"] <= 0.1 + 1e-7
        assert h["ref_gap"] != 0.0
    for h in hist:
        expect = float(curriculum.b_schedule("paper", step=h["step"] - 1, total_steps=4, epoch=h["epoch"] - 1,
                                             num_epochs=2, steps_per_epoch=2, b0=0.5))
        assert h["beta"] == pytest.approx(expect)
    assert hist[0]["beta"] < hist[-1]["beta"]  # b rises
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "alpha_mean" in json.loads(lines[-1])


def _run_cli(cfg_path, *extra, wait=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "distillm2_jax.cli", "train", str(cfg_path), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        return out
    return proc


def _wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny, tmp_path):
    paths = build_tiny_run(tmp_path / "data", num_prompts=32)
    settings = {"checkpoint.every_steps": 1, "train.epochs": 2}
    full = train(tiny_config(paths, tmp_path / "full", **settings))
    assert full.steps == 8
    cfg_path = config_lib.dump(tiny_config(paths, tmp_path / "killed", **settings), tmp_path / "killed.yaml")
    proc = _run_cli(cfg_path, wait=False)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    _wait_for(lambda: (ckpt_dir / "3").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = Checkpointer(ckpt_dir, async_save=False).latest()
    assert steps_at_kill is not None and steps_at_kill < 8
    _run_cli(cfg_path)
    _assert_params_close(_params(tmp_path / "killed"), _params(tmp_path / "full"), atol=1e-6)


def test_sigterm_writes_checkpoint_and_exits_cleanly(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", **{"checkpoint.every_steps": 100})
    cfg_path = config_lib.dump(cfg, tmp_path / "run.yaml")
    proc = _run_cli(cfg_path, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preempted" in out
    latest = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False).latest()
    assert latest is not None and 1 <= latest < 4


def test_interrupted_save_keeps_last_good_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny, run_dir), max_steps=2)
    ckpt_dir = run_dir / "checkpoints"
    # what a save killed midway leaves: a temporary folder that was never renamed
    partial = ckpt_dir / "3.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    assert Checkpointer(ckpt_dir, async_save=False).latest() == 2
    resumed = train(tiny_config(tiny, run_dir))
    assert resumed.steps == 4 and resumed.history[0]["step"] == 3


def test_resume_inside_a_curriculum_epoch_matches_uninterrupted(tiny, tmp_path):
    """Stopped after epoch 2's first step and resumed: m comes from the checkpoint and the
    teacher's per-sequence log-probs of the batches left are recomputed; the last step and the
    final parameters are those of the uninterrupted run."""
    generated = {"data.pairs": "null", "generation.regenerate_student": "true"}   # a varies per row
    full = train(tiny_config(tiny, tmp_path / "full", **generated))
    assert train(tiny_config(tiny, tmp_path / "resumed", **generated), max_steps=3).steps == 3
    rest = train(tiny_config(tiny, tmp_path / "resumed", **generated))
    assert [h["step"] for h in rest.history] == [4]
    last, want = rest.history[0], full.history[3]
    assert last["alpha_min"] < last["alpha_max"]   # the curriculum is on in the resumed step
    for key in ("ref_gap", "loss", "alpha_min", "alpha_max", "alpha_mean", "grad_norm"):
        np.testing.assert_allclose(last[key], want[key], rtol=1e-6, err_msg=key)
    _assert_params_close(_params(tmp_path / "resumed"), _params(tmp_path / "full"), atol=1e-6)


def test_restore_onto_another_mesh_continues_the_trajectory(tiny, tmp_path):
    full = train(tiny_config(tiny, tmp_path / "full", **{"mesh.shape": "[8,1,1]", "train.micro_batch": 8}))
    first = train(tiny_config(tiny, tmp_path / "moved", **{"mesh.shape": "[8,1,1]", "train.micro_batch": 8}),
                  max_steps=2)
    assert first.steps == 2
    rest = train(tiny_config(tiny, tmp_path / "moved", **{"mesh.shape": "[2,2,2]", "train.micro_batch": 8}))
    losses = [h["loss"] for h in first.history + rest.history]
    np.testing.assert_allclose(losses, [h["loss"] for h in full.history], rtol=2e-5)


def test_lora_run_exports_merged_student_loadable_by_transformers(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from distillm2_jax.cli import main

    run_dir = tmp_path / "lora"
    result = train(tiny_config(tiny, run_dir, **{"lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8,
                                                  "train.epochs": 1, "optim.lr": "1e-2"}))
    assert result.steps == 2
    student = restore_student(run_dir)
    assert not any("lora" in k for k in student.params()["layers"])
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = np.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = (ids != 0).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(student(ids, attention_mask=mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4)
    base = _base_params(tiny["student"])
    assert np.abs(np.asarray(student.params()["layers"]["q"]) - base["layers"]["q"]).max() > 0, \
        "LoRA training should have changed the merged weights"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def _base_params(path):
    from distillm2_jax.hf.load import from_pretrained
    return jax.tree.map(np.asarray, from_pretrained(path).params())


def test_missing_model_path_is_one_clear_line(tiny, tmp_path, capsys):
    from distillm2_jax.cli import main

    cfg = tiny_config(tiny, tmp_path / "run")
    cfg_path = config_lib.dump(cfg, tmp_path / "bad.yaml")
    assert main(["train", str(cfg_path), f"model.student={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.student" in err and "nope" in err
    with pytest.raises(UserError, match="train.micro_batch=4 must be a multiple of the 8"):
        train(tiny_config(tiny, tmp_path / "r2", **{"mesh.shape": "[8,1,1]"}))


def test_a_teacher_free_run_takes_the_students_tokenizer(tiny, tmp_path):
    """SFT on given pairs with no teacher configured: the tokenizer falls back to the student's
    folder (`Config.tokenizer_path`), for training and for export, and the run trains."""
    cfg = config_lib.with_overrides(tiny_config(tiny, tmp_path / "run"), {
        "model.teacher": None, "objective.name": "sft", "train.epochs": 1})
    assert cfg.model.teacher is None and cfg.tokenizer_path == str(tiny["student"])
    result = train(cfg, max_steps=1)
    assert result.history and np.isfinite(result.history[-1]["loss"])
    out = export_run(result.run_dir, tmp_path / "export")
    assert (out / "tokenizer_config.json").is_file()
