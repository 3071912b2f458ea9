"""Quickstart: a complete DistiLLM-2 run on a toy setup, offline, in about a minute on a CPU.

Builds a tiny tokenizer, a 2-layer teacher and a smaller 2-layer student (random weights, Qwen2
family), 64 prompts, then runs Algorithm 1 for 2 epochs with the same code a real run uses:
teacher responses sampled once, student responses re-sampled from the current student each
epoch, the a curriculum switched on in epoch 2, checkpoints, and an export of the student to a
Hugging Face folder, reloaded to check it. It prints the loss of the first and last steps and
the student's NLL on the teacher's responses before and after distillation (lower is better).

The toy teacher is random (a sharp random distribution, not a task it knows), so this shows the
whole pipeline working and the objective falling, not a useful student.

    python examples/quickstart.py [--out DIR] [--epochs 2]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np

from distillm2_jax import api, toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="distillm2-quickstart-"))
    paths = toy.build_toy_models(root)
    prompts = toy.write_toy_prompts(root / "prompts.jsonl", 64)
    cfg = api.with_overrides(api.Config(), {
        "run_dir": str(root / "run"), "model.teacher": str(paths["teacher"]), "model.student": str(paths["student"]),
        "model.teacher_dtype": "float32", "model.compute_dtype": "float32",
        "data.prompts": str(prompts), "data.max_length": 64, "data.max_prompt_length": 32,
        "generation.max_new_tokens": 16, "generation.batch_size": 32, "generation.temperature": 1.0,
        "train.epochs": args.epochs, "train.global_batch": 16, "optim.lr": 3e-3, "optim.warmup_ratio": 0.0, "objective.chunk_size": 32,
        "checkpoint.every_steps": 4, "logging.tensorboard": False,
    })
    tokenizer = api.load_tokenizer(str(paths["tokenizer"]))
    run = api.train(cfg)

    teacher_pairs = root / "run" / "data" / "pairs_epoch1.jsonl"
    kw = dict(max_length=64, max_prompt_length=32)
    before = api.nll(api.from_pretrained(paths["student"]), str(teacher_pairs), tokenizer, **kw)
    after = api.nll(api.restore_student(run.run_dir), str(teacher_pairs), tokenizer, **kw)
    out = api.export(run.run_dir, root / "export")

    from transformers import AutoConfig
    AutoConfig.from_pretrained(str(out), local_files_only=True)   # transformers reads the exported folder
    api.load_tokenizer(out)
    reloaded = api.from_pretrained(out)
    ids = np.array([tokenizer.encode("red cat sort")])
    same = np.allclose(np.asarray(reloaded(ids)), np.asarray(api.restore_student(run.run_dir)(ids)), atol=1e-5)

    print()
    print(f"run folder: {run.run_dir}  ({run.steps} steps, {run.epochs_completed} epochs)")
    print(f"student NLL on teacher responses: before {before.nll:.3f}  after {after.nll:.3f}  "
          f"({before.tokens} tokens)")
    print(f"exported student: {out}  (reloaded logits identical: {same})")
    first, last = run.history[0], run.history[-1]
    print(f"loss: first step {first['loss']:.4f}, last step {last['loss']:.4f}  "
          f"(last: skl {last['skl']:.4f}, srkl {last['srkl']:.4f}, a in [{last['alpha_min']:.3f}, "
          f"{last['alpha_max']:.3f}], b {last['beta']:.3f})")


if __name__ == "__main__":
    main()
