"""`distillm2 export RUN_DIR OUT_DIR`: the trained student (LoRA merged) as a Hugging Face folder."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run's student as a Hugging Face folder",
                              description=__doc__)
    p.add_argument("run_dir", help="the run folder (holds config.yaml and checkpoints/)")
    p.add_argument("out_dir", help="where to write the Hugging Face folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of the written weights (default: the student's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax.train.export import export_run

    out = export_run(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
    print(f"exported {args.run_dir} -> {out}")
    return 0
