"""Before/after of the train step across two checkouts: did a change make the step slower?

Runs `benchmarks/train_throughput.py`'s own "ours" worker (the jitted DistiLLM-2 step of that
checkout, default settings: 2 pairs x T=512, float32, chunk 128) from each checkout, and steps
them alternately, one at a time, with the order swapped every round, so a change in host load hits
both alike. Prints each side's compile time, median step time (epoch-1 step and curriculum step),
the median of the per-round after/before ratios, whether the losses are equal at every step, and
peak RSS.

    git worktree add /tmp/old <commit>
    python benchmarks/step_ab.py /tmp/old            # this checkout is "after"
    python benchmarks/step_ab.py /tmp/old --rounds 10
    python benchmarks/step_ab.py /tmp/old --compiles 2 --rounds 0   # compile times only

The compile times printed with the timed rounds are those of two workers started one after the
other (the second compiles while the first is alive); `--compiles N` first starts each side's
worker ALONE, alternately, N times, and prints each compile time.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _benchmark_module(checkout: Path, name: str):
    """The checkout's train_throughput.py as a module (its workers run that checkout's code)."""
    path = checkout / "benchmarks" / "train_throughput.py"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (give the root of a checkout of this project)")
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="root of the checkout to compare against")
    ap.add_argument("--after", type=Path, default=HERE.parent, help="root of the new checkout (default: this one)")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up (default 6; 0: none)")
    ap.add_argument("--compiles", type=int, default=0, help="first, N compiles of each side, each worker alone")
    args = ap.parse_args()
    before = _benchmark_module(args.before.resolve(), "train_throughput_before")
    after = _benchmark_module(args.after.resolve(), "train_throughput_after")
    s_cfg, t_cfg = after.model_configs(False, 512)
    spec = dict(student=s_cfg, teacher=t_cfg, pairs=2, seq=512, prompt=128, seed=0, lr=5e-5, schedule="cosine",
                total_steps=1000, dtype="float32", chunk=128)
    print(f"command: python benchmarks/step_ab.py {' '.join(sys.argv[1:])}")
    times = {"before": [], "after": []}
    for _ in range(args.compiles):
        for label, module in (("after", after), ("before", before)):
            w = module.Worker(label, "ours", spec)
            times[label].append(w.info["compile_s"])
            w.close()
    if args.compiles:
        print("compile s, each worker alone, alternately: " + "; ".join(
            f"{k} {', '.join(f'{t:.1f}' for t in v)}" for k, v in times.items()))
    if args.rounds < 1:
        return 0
    old, new = before.Worker("before", "ours", spec), after.Worker("after", "ours", spec)
    print(f"compile s: before {old.info['compile_s']:.1f}, after {new.info['compile_s']:.1f}")
    flags = ("off", "on")
    for w in (old, new):
        for f in flags:
            w.step(f, record=False)
    for r in range(args.rounds):
        for f in flags:
            for w in ((old, new) if r % 2 == 0 else (new, old)):
                w.step(f)
    for f, what in zip(flags, ("epoch-1 step (curriculum off)", "curriculum step (epoch >= 2)")):
        tb, ta = old.times[f], new.times[f]
        ratio = statistics.median(a / b for a, b in zip(ta, tb))
        print(f"{what}: median s before {statistics.median(tb):.2f} ({min(tb):.2f}-{max(tb):.2f}), "
              f"after {statistics.median(ta):.2f} ({min(ta):.2f}-{max(ta):.2f}); paired after/before "
              f"{ratio:.3f}; losses equal at every step: {old.losses[f] == new.losses[f]}")
    print(f"peak RSS MB: before {old.close():.0f}, after {new.close():.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
