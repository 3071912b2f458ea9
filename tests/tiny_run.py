"""A tiny teacher/student pair sharing a tiny tokenizer, prompts and pairs files, and a run config.

Everything is built locally in a few seconds; used by the trainer tests.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from distillm2_jax import config as config_lib
from tests.tiny_models import build_hf_model
from tests.tiny_tokenizer import VOCAB_SIZE, build_tiny_tokenizer

WORDS = ["red", "blue", "cat", "dog", "sum", "two", "three", "sort", "list", "up", "down", "left"]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_tiny_run(root: Path, *, num_prompts: int = 16, seed: int = 0) -> dict:
    """Write tokenizer, teacher, student, prompts.jsonl and pairs.jsonl under root."""
    root = Path(root)
    tok = build_tiny_tokenizer(root / "tokenizer")
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.1)
    build_hf_model("qwen2", root / "teacher", seed=seed, hidden_size=64, intermediate_size=128, **common)
    build_hf_model("qwen2", root / "student", seed=seed + 1, hidden_size=32, intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common)
    for d in ("teacher", "student"):
        tok.save_pretrained(str(root / d))
    rng = random.Random(seed)
    prompts = [f"{_text(rng, 3)} {i}" for i in range(num_prompts)]
    with open(root / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for p in prompts:
            chosen = [{"role": "user", "content": p}, {"role": "assistant", "content": _text(rng, rng.randint(2, 6))}]
            rejected = [{"role": "user", "content": p}, {"role": "assistant", "content": _text(rng, rng.randint(1, 7))}]
            f.write(json.dumps({"prompt": p, "chosen": chosen, "rejected": rejected}) + "\n")
    return {"root": root, "teacher": root / "teacher", "student": root / "student",
            "prompts": root / "prompts.jsonl", "pairs": root / "pairs.jsonl"}


def tiny_config(paths: dict, run_dir: Path, **overrides) -> config_lib.Config:
    """A config for a short run on the tiny models (float32, small batches, no progress bar)."""
    base = [
        f"run_dir={run_dir}", f"model.teacher={paths['teacher']}", f"model.student={paths['student']}",
        "model.teacher_dtype=float32", "model.compute_dtype=float32",
        f"data.pairs={paths['pairs']}", f"data.prompts={paths['prompts']}",
        "data.max_length=48", "data.max_prompt_length=24",
        "generation.max_new_tokens=8", "generation.batch_size=8", "generation.regenerate_student=false",
        "train.epochs=2", "train.global_batch=8", "train.micro_batch=4", "train.log_every=1",
        "optim.lr=1e-3", "optim.warmup_ratio=0.0", "objective.chunk_size=16",
        "checkpoint.every_steps=2", "checkpoint.async_save=false", "logging.progress=false",
        "logging.tensorboard=false", "mesh.shape=[1,1,1]",
    ]
    extra = [f"{k}={v}" for k, v in overrides.items()]
    return config_lib.with_overrides(config_lib.Config(), base + extra)
