"""`distillm2 demo [--out DIR] [--quick]`: DistiLLM-2 end to end on the embedded task, offline.

A packaged teacher that knows a small procedural task (reverse a word, sort its letters, add
two numbers) is distilled into a smaller student that had only a short supervised warm-up:
teacher and student responses are generated, paired and trained on for two epochs with the
curriculum, next to a KD baseline with the same budget; the students are evaluated on held-out
prompts and the DistiLLM-2 student is exported to a Hugging Face folder and reloaded. About
4 minutes on a 2-core CPU. The output folder is described in docs/demo.md.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run DistiLLM-2 end to end on the embedded task (no download)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="distillm2-demo", help="output folder (default: ./distillm2-demo)")
    p.add_argument("--quick", action="store_true", help="a reduced run (seconds of training; for smoke tests)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="distillation epochs (default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax.demo.run import DemoSettings, run_demo

    kw = {"seed": args.seed}
    if args.epochs is not None:
        if args.epochs < 1:
            from distillm2_jax.errors import UserError
            raise UserError(f"--epochs must be at least 1, got {args.epochs}")
        kw["epochs"] = args.epochs
    settings = DemoSettings.quick(**kw) if args.quick else DemoSettings(**kw)
    run_demo(args.out, settings, overwrite=args.overwrite)
    return 0
