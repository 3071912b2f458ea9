"""The Python API for scripted experiments; the `distillm2` CLI is a thin layer over it.

    from distillm2_jax import api

    cfg = api.load_config("configs/default.yaml", ["train.epochs=2"])   # or api.Config() in code
    for objective in ("distillm2", "kd", "gkd"):
        run = api.train(api.with_overrides(cfg, {"objective.name": objective, "run_dir": f"runs/{objective}"}))
        student = api.restore_student(run.run_dir)
        print(objective, api.nll(student, "heldout_pairs.jsonl", api.load_tokenizer(cfg.model.teacher)))
        # the teacher decoding with the student as its draft (docs/speculative.md):
        # api.sample(teacher, prompt_ids, max_new_tokens=256, draft=student, draft_tokens=4)
        # api.measure_speedup(teacher, student, prompt_ids) -> SpeedupResult(speedup, acceptance_rate, ...)
        api.export(run.run_dir, f"exports/{objective}")
"""
from __future__ import annotations

from distillm2_jax.config import Config, dump as dump_config, load as load_config, with_overrides
from distillm2_jax.data.pairs import build_pairs, read_pairs
from distillm2_jax.data.tokenizer import load_tokenizer
from distillm2_jax.evaluate import (AcceptanceResult, ExactMatchResult, NLLResult, SpeedupResult, acceptance_rate,
                                    exact_match, measure_speedup, nll, respond)
from distillm2_jax.generation import generate_file, sample
from distillm2_jax.hf import from_pretrained, save_pretrained
from distillm2_jax.models import from_config
from distillm2_jax.train.export import export_run as export, restore_student
from distillm2_jax.train.loop import RunResult, Trainer, train

__all__ = [
    "AcceptanceResult", "Config", "ExactMatchResult", "NLLResult", "RunResult", "Trainer", "acceptance_rate",
    "build_pairs", "dump_config", "exact_match", "export", "from_config", "from_pretrained", "generate_file",
    "load_config", "load_tokenizer", "measure_speedup", "nll", "read_pairs", "respond", "restore_student", "sample",
    "save_pretrained", "SpeedupResult", "train", "with_overrides",
]
