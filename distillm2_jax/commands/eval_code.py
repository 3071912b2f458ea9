"""`distillm2 eval-code --problems P.jsonl --samples S.jsonl`: pass@1 / pass@k of code made elsewhere.

Problems in HumanEval format (`task_id`, `prompt`, `test`, `entry_point`; EvalPlus files too) or
MBPP format (`task_id`, `text`, `test_list`); samples with `task_id` and `completion` (appended
to the prompt) or `solution` (a whole program). Every sample runs in its own sandboxed process
(timeout, CPU / memory / file-size limits, its own temporary directory, no writes outside it, no
network, stdin closed; docs/evaluation.md says what it does not protect against). `--out` gets
one JSON line per sample: `task_id`, `passed`, `result` (passed, failed, timeout, memory, error)
and a short `detail`.
"""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-code", help="pass@k of code samples, each run in a sandboxed subprocess",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", required=True, help="HumanEval- or MBPP-format problems (JSONL, JSON, parquet)")
    p.add_argument("--samples", required=True, help="samples: `task_id` + `completion` or `solution`")
    p.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per sample (default 3)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per sample (MiB)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="samples run side by side (default: half the cores, at most 8)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 10, 100], help="the k of pass@k (default 1 10 100)")
    p.add_argument("--out", default=None, help="write one JSON result per sample here")
    p.set_defaults(func=run)


def run(args) -> int:
    from distillm2_jax.errors import UserError
    from distillm2_jax.protocols import code
    from distillm2_jax.protocols.sandbox import Limits

    if not args.timeout > 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    for name in ("memory_mb", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(k < 1 for k in args.k):
        raise UserError(f"--k values must be at least 1, got {args.k}")
    problems = code.read_problems(args.problems)
    samples = code.read_samples(args.samples, problems)
    res = code.score(problems, samples, limits=Limits(timeout=args.timeout, memory_mb=args.memory_mb),
                     workers=args.workers, ks=tuple(args.k))
    print(f"{len(samples)} samples of {res.problems} problems ({args.samples})")
    print(code.format_result(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for r in res.results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"written to {args.out}")
    return 0
