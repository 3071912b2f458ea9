"""The shipped recipe "distil with DistiLLM-2, then DPO from it" (docs/dpo.md) runs end to end on
tiny models: the shipped configs with tiny paths and sizes as overrides."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillm2_jax.cli import main
from tests.objectives.test_dpo import write_separable_pairs
from tests.tiny_run import build_tiny_run

REPO = Path(__file__).resolve().parents[2]
DISTIL = REPO / "configs" / "qwen2.5-7b_to_1.5b.yaml"
DPO = REPO / "configs" / "qwen2.5-1.5b_dpo.yaml"
# Tiny sizes for both runs (the shipped values are for 8 GPUs and 1024-token rows).
SMALL = ["mesh.shape=[1,1,1]", "model.compute_dtype=float32", "data.max_length=48", "data.max_prompt_length=24",
         "train.global_batch=8", "train.micro_batch=8", "logging.progress=false", "logging.tensorboard=false",
         "checkpoint.async_save=false", "optim.warmup_ratio=0.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    tiny = build_tiny_run(root, num_prompts=16)
    return {**tiny, "preferences": write_separable_pairs(tiny["prompts"], root / "preferences.jsonl")}


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _dpo_overrides(run_dir, student, pairs):
    return [f"run_dir={run_dir}", f"model.student={student}", f"data.pairs={pairs}", "optim.lr=2e-2",
            "train.log_every=1", *SMALL]


def test_shipped_dpo_config_trains_from_a_student_folder(tiny, tmp_path):
    """The recipe's second command on a tiny 'exported student' (LoRA on, as shipped): step 1
    starts at log 2 (the reference is the starting student), then the loss falls."""
    run_dir = tmp_path / "dpo"
    assert main(["train", str(DPO), *_dpo_overrides(run_dir, tiny["student"], tiny["preferences"]),
                 "train.epochs=2"]) == 0
    hist = _history(run_dir)
    assert len(hist) == 4 and hist[0]["beta"] == 0.1
    assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert not (run_dir / "data").exists()          # nothing generated


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "distillm2_jax.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_distil_then_dpo_from_the_exported_student(tiny, tmp_path):
    """The recipe as documented, each command its own process: DistiLLM-2 (Algorithm 1, sampling
    teacher and student responses), export, then DPO whose model.student is the exported folder."""
    distil, dpo = tmp_path / "distil", tmp_path / "dpo"
    _cli("train", DISTIL, f"run_dir={distil}", f"model.teacher={tiny['teacher']}", f"model.student={tiny['student']}",
         f"data.prompts={tiny['prompts']}", "model.teacher_dtype=float32", "generation.max_new_tokens=8",
         "generation.batch_size=8", "train.epochs=2", *SMALL)
    assert (distil / "data" / "student_epoch2.jsonl").is_file()
    _cli("export", distil, distil / "student")
    _cli("train", DPO, *_dpo_overrides(dpo, distil / "student", tiny["preferences"]), "train.epochs=2")
    hist = _history(dpo)
    assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert hist[-1]["loss"] < hist[0]["loss"]
    _cli("export", dpo, dpo / "student")
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(dpo / "student").num_parameters() > 0
