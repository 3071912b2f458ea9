"""The paper's comparison in miniature, on the embedded demo task: KD, SeqKD, GKD, DistiLLM
(v1), DistiLLM-2, and the DistiLLM-2 ablation (contrastive loss only, + rising b, + curriculum
a = the full method), over several seeds, reported as mean and standard deviation.

For each seed: new data draws, a new student warm-up, one set of teacher responses shared by
every method (so methods differ only in the objective), then each method trains for the same
number of epochs and steps from the same warm-up student. Every student is evaluated on the
same held-out prompts: exact match (greedy), NLL of held-out teacher responses, and the
acceptance rate as a speculative-decoding draft for the teacher.

    python experiments/compare.py [--seeds 0 1 2] [--out runs/compare] [--table docs/experiments.md]

About 18 minutes on a 2-core CPU with the defaults. Writes OUT/results.json (every run) and the
markdown table (docs/experiments.md by default).
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax

from distillm2_jax import api, models
from distillm2_jax.demo import assets, run, task

# name -> (objective, extra config keys). "+ curriculum a" of the ablation is DistiLLM-2 itself.
METHODS = {
    "KD": ("kd", {}),
    "SeqKD": ("seqkd", {}),
    "GKD": ("gkd", {}),
    "DistiLLM": ("distillm", {}),
    "DistiLLM-2": ("distillm2", {}),
    "contrastive only (constant b, no a curriculum)": (
        "distillm2", {"objective.beta_schedule": "constant", "objective.curriculum": False}),
    "+ rising b (no a curriculum)": ("distillm2", {"objective.beta_schedule": "paper", "objective.curriculum": False}),
}
ABLATION = ("contrastive only (constant b, no a curriculum)", "+ rising b (no a curriculum)", "DistiLLM-2")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def run_seed(out: Path, seed: int, settings: run.DemoSettings, methods: list[str], heldout, log) -> dict:
    s = dataclasses.replace(settings, seed=seed)
    root = out / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = assets.build_tokenizer(root / "tokenizer")
    files = run.write_data(root, s)
    run.warm_up_student(root, files["sft"], tokenizer, s, progress=False)
    teacher = models.from_pretrained(assets.TEACHER_DIR)
    pairs = run.heldout_pairs(root, teacher, tokenizer, out / "heldout.jsonl", s)
    rows = {"student (warm-up only)": run.evaluate_model(models.from_pretrained(root / "student_sft"), teacher,
                                                         tokenizer, heldout, pairs)}
    teacher_file = None
    for name in methods:
        objective, extra = METHODS[name]
        t0 = time.perf_counter()
        cfg = run.train_config(root, s, objective, teacher_responses=teacher_file, run_name=slug(name),
                               overrides={"logging.progress": False, **extra})
        result = api.train(cfg, log=lambda m: None)
        if teacher_file is None:
            teacher_file = Path(cfg.run_dir) / "data" / "teacher.jsonl"
        rows[name] = run.evaluate_model(api.restore_student(result.run_dir), teacher, tokenizer, heldout, pairs)
        rows[name]["train_s"] = round(time.perf_counter() - t0, 1)
        r = rows[name]
        log(f"seed {seed} {name}: exact match {r['exact_match']:.3f}, NLL {r['nll']:.4f}, "
            f"acceptance {r['acceptance']:.3f} ({r['train_s']:.0f} s)")
    rows["teacher"] = run.evaluate_model(teacher, teacher, tokenizer, heldout, pairs)
    return rows


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict, names: list[str]) -> str:
    seeds = sorted(results)
    head = "| method | exact match | reverse | sort | add | NLL (teacher resp.) ↓ | acceptance ↑ |"
    lines = [head, "|" + "---|" * 7]
    for name in names:
        rows = [results[s][name] for s in seeds if name in results[s]]
        cells = [_mean_std([r["exact_match"] for r in rows])]
        cells += [_mean_std([r["per_skill"][k] for r in rows]) for k in ("reverse", "sort", "add")]
        cells += [_mean_std([r["nll"] for r in rows])]
        cells += [_mean_std([r["acceptance"] for r in rows]) if "acceptance" in rows[0] else "—"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--table", default="docs/experiments.md", help="markdown file the table is written into")
    ap.add_argument("--quick", action="store_true", help="the demo's reduced sizes (a smoke test)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every run compiles the same shapes: the persistent cache turns later compiles into loads.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    settings = run.DemoSettings.quick() if args.quick else run.DemoSettings()
    heldout = task.make_examples(settings.heldout, seed=0, split="heldout")
    task.write_jsonl(out / "heldout.jsonl", heldout)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(out, seed, settings, args.methods, heldout, log)
        (out / "results.json").write_text(json.dumps({"settings": dataclasses.asdict(settings),
                                                       "results": results}, indent=2) + "\n")
    wall = time.perf_counter() - t0
    names = ["teacher", "student (warm-up only)", *[m for m in args.methods if m not in ABLATION or m == "DistiLLM-2"]]
    ablation = [m for m in ABLATION if m in args.methods]
    text = "\n\n".join([table(results, names), "Ablation (each row adds one part):", table(results, ablation)])
    print(text)
    print(f"\n{len(args.seeds)} seeds, {len(args.methods)} methods in {wall / 60:.1f} min")
    if args.table:
        write_table(Path(args.table), text, settings, args.seeds, wall, " ".join(sys.argv[1:]))


def write_table(path: Path, text: str, s, seeds, wall: float, argv: str) -> None:
    """Replace the generated block of `path` (between the markers) with the new table."""
    start, end = "<!-- compare.py table: start -->", "<!-- compare.py table: end -->"
    block = (f"{start}\n`python experiments/compare.py {argv}`: seeds {seeds}, {s.epochs} epochs over "
             f"{s.distill_prompts} prompts (batch {s.global_batch}, lr {s.lr}), student warm-up {s.sft_steps} steps, "
             f"{s.heldout} held-out prompts; mean ± standard deviation over seeds; {wall / 60:.1f} min.\n\n"
             f"{text}\n{end}")
    old = path.read_text() if path.exists() else f"# Experiments\n\n{start}\n{end}\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
    print(f"table written to {path}")


if __name__ == "__main__":
    main()
