"""Train the demo's teacher and write it to distillm2_jax/demo/teacher/ (the packaged weights).

The teacher is the demo architecture's larger model (`demo.assets.TEACHER_CONFIG`) trained by
plain supervised fine-tuning on freshly drawn examples of the procedural task (split
"teacher", which never contains a held-out prompt) to write the worked solutions. It is saved
in bfloat16 (about 3.4 MB) with
the demo tokenizer. Its held-out exact match is printed at the end and recorded in
distillm2_jax/demo/teacher/training.json.

    python experiments/train_demo_teacher.py [--steps 800] [--out distillm2_jax/demo/teacher]
"""
import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp

from distillm2_jax import models
from distillm2_jax.demo import assets, evaluation, run, sft, task
from distillm2_jax.hf import from_pretrained, save_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--examples", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue from this HF folder instead of a random init")
    ap.add_argument("--out", default=str(assets.TEACHER_DIR))
    args = ap.parse_args()

    tokenizer = assets.build_tokenizer()
    data = [(e.prompt, e.solution) for e in task.make_examples(args.examples, seed=args.seed, split="teacher",
                                                                       distinct=False)]
    if args.init:
        model = from_pretrained(args.init, dtype=jnp.float32)
    else:
        model = models.from_config(assets.TEACHER_CONFIG, seed=args.seed)
    t0 = time.time()
    model, history = sft.finetune(model, data, tokenizer, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, log_every=100, progress=False,
                                  max_length=run.MAX_LENGTH, max_prompt_length=run.MAX_PROMPT_LENGTH, warmup=200)
    train_s = time.time() - t0
    heldout = task.make_examples(600, seed=0, split="heldout")
    acc = evaluation.task_accuracy(model, heldout, tokenizer, max_new_tokens=run.MAX_NEW_TOKENS)
    print(f"trained {args.steps} steps in {train_s:.0f} s; held-out exact match {acc['exact_match']:.3f} "
          f"({acc['per_skill']})")
    out = Path(args.out)
    save_pretrained(model, out, tokenizer=tokenizer, dtype=jnp.bfloat16)
    (out / "training.json").write_text(json.dumps({
        "command": "python experiments/train_demo_teacher.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "init": args.init, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "examples": args.examples,
        "seed": args.seed, "train_seconds": round(train_s), "final_loss": history[-1],
        "heldout_exact_match": acc["exact_match"], "heldout_per_skill": acc["per_skill"]}, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
