"""The paper's comparison in miniature, on the embedded demo task: KD, SeqKD, GKD, DistiLLM (v1) and
DistiLLM-2, the DistiLLM-2 ablation (contrastive loss only, + rising b, + a curriculum = the full
method) and DistiLLM-2 with the authors' code b schedule, over several seeds.

For each seed: new data draws, a new student warm-up, one set of teacher responses shared by
every method (so methods differ only in the objective), then each method trains for the same
epochs and steps from the same warm-up student (`demo_lab`). Every student is evaluated on the
same held-out prompts: exact match (greedy), NLL of held-out teacher responses, NLL of its own
sampled responses, and the acceptance rate as a speculative-decoding draft for the teacher.

Reported: mean ± standard deviation over seeds per method, and the paired difference of every
method against KD and against DistiLLM (v1) per metric: mean over seeds of (method - reference)
with a 95% Student-t interval (`distillm2_jax.stats`).

    python experiments/compare.py [--seeds 0 1 2 3 4] [--methods KEY ...] [--out runs/compare]
                                  [--table docs/experiments.md | --table ''] [--quick]
                                  [--time-budget MINUTES] [--estimate]

Writes OUT/results.json (settings, every row of every seed, the summaries and intervals, timings)
and the markdown tables between the `compare.py table` markers of docs/experiments.md (not for
--quick unless --table is given). Prints a time estimate first (--estimate: only that), then the
projected total after each seed; with --time-budget it does not start a seed the projection says
would end past the budget.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_lab, also when loaded by file path
import demo_lab as lab  # noqa: E402

from distillm2_jax import stats  # noqa: E402
from distillm2_jax import objectives  # noqa: E402
from distillm2_jax.demo import run  # noqa: E402
from distillm2_jax.protocols import report as protocol_report  # noqa: E402
from distillm2_jax.errors import UserError  # noqa: E402

M = lab.Method
METHODS = (
    M("kd", "KD", "kd"),
    M("seqkd", "SeqKD", "seqkd"),
    M("gkd", "GKD", "gkd"),
    M("distillm", "DistiLLM", "distillm"),
    M("distillm2", "DistiLLM-2", "distillm2"),
    M("contrastive", "contrastive only (b = 0.5 constant, a = 0.1 fixed)", "distillm2",
      {"objective.beta_schedule": "constant", "objective.curriculum": False}),
    M("rising-b", "+ rising b (a = 0.1 fixed)", "distillm2",
      {"objective.beta_schedule": "paper", "objective.curriculum": False}),
    M("linear-b", "DistiLLM-2, authors' code b (0.5 → 0.75)", "distillm2", {"objective.beta_schedule": "linear"}),
)
MAIN = ("kd", "seqkd", "gkd", "distillm", "distillm2")
ABLATION = ("contrastive", "rising-b", "distillm2", "linear-b")  # "+ a curriculum" is DistiLLM-2 itself
ABLATION_LABELS = {"distillm2": "+ a curriculum (= DistiLLM-2)"}
REFERENCES = ("kd", "distillm")
BASE = {"teacher": "teacher", "warmup": "student (warm-up only)"}
# key, column, format
METRICS = (("exact_match", "exact match ↑", ".3f"), ("nll", "NLL teacher resp. ↓", ".3f"),
           ("own_nll", "NLL own resp.", ".3f"), ("acceptance", "acceptance ↑", ".3f"))

# Seconds on an idle 2-core CPU, fitted to seeds 2 and 3 of the default 5-seed run (docs/experiments.md,
# "Cost"): per seed `seed_s + sft_step_s * sft_steps` (seed_s includes sampling the teacher's responses
# once), plus `first_seed_s` once (compiles; later seeds load them from the cache); per trained method
# `method_s + prompt_epoch_s * prompts * epochs` (the second term x `on_policy_factor` for methods that
# sample the student); per evaluated model `eval_s + heldout_s * heldout`.
COST = dict(first_seed_s=120.0, seed_s=45.0, sft_step_s=0.44, method_s=8.0, prompt_epoch_s=0.013,
            on_policy_factor=1.8, eval_s=1.5, heldout_s=0.015)


def label(key: str) -> str:
    return BASE.get(key) or next(m.label for m in METHODS if m.key == key)


def estimate_minutes(s: run.DemoSettings, n_seeds: int, methods: list[lab.Method]) -> float:
    """A rough wall-time estimate of a run (COST), to see the cost before paying it."""
    c = COST
    per_eval = c["eval_s"] + c["heldout_s"] * s.heldout
    per_seed = c["seed_s"] + c["sft_step_s"] * s.sft_steps + 2 * per_eval   # + the teacher and the warm-up
    for m in methods:
        on_policy = c["on_policy_factor"] if objectives.get(m.objective).student_responses else 1.0
        per_seed += c["method_s"] + c["prompt_epoch_s"] * s.distill_prompts * s.epochs * on_policy + per_eval
    return (c["first_seed_s"] + n_seeds * per_seed) / 60


def run_seed(out: Path, seed: int, settings: run.DemoSettings, methods: list[lab.Method], heldout, heldout_file,
             log) -> tuple[dict, dict]:
    """Every row of one seed ({key: metrics}) and the seed's own timings."""
    s = dataclasses.replace(settings, seed=seed)
    start = lab.prepare_start(out / f"seed{seed}", s, heldout, heldout_file)
    rows = {"teacher": lab.measure(start.teacher, start, "teacher"),
            "warmup": lab.measure(start.student(), start, "warmup")}
    for m in methods:
        r = rows[m.key] = lab.train_and_measure(start, m)
        if "diverged" in r:
            log(f"seed {seed} {m.label}: DIVERGED ({r['diverged']})")
            continue
        log(f"seed {seed} {m.label}: exact match {r['exact_match']:.3f}, NLL {r['nll']:.4f}, "
            f"own NLL {r['own_nll']:.4f}, acceptance {r['acceptance']:.3f} "
            f"(train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)")
    return rows, start.timings


# ------------------------------------------------------------------------------------------ summaries
def values(results: dict, key: str, metric: str) -> list[float]:
    """`metric` of row `key` in every seed that has the row, in seed order."""
    return [lab.value(results[s][key], metric) for s in sorted(results) if key in results[s]]


def summarize(results: dict, keys: list[str]) -> dict:
    """{key: {metric: mean_ci}} and {reference: {key: {metric: paired difference + bootstrap}}}."""
    summary = {k: {m: stats.mean_ci(values(results, k, m)).to_dict() for m, _, _ in METRICS
                   if values(results, k, m)} for k in keys}
    paired = {}
    for ref in REFERENCES:
        if ref not in keys:
            continue
        paired[ref] = {}
        for k in keys:
            if k in (ref, *BASE):
                continue
            seeds = [s for s in sorted(results) if k in results[s] and ref in results[s]]
            paired[ref][k] = {}
            for m, _, _ in METRICS:
                a = [lab.value(results[s][k], m) for s in seeds]
                b = [lab.value(results[s][ref], m) for s in seeds]
                d = stats.paired_difference(a, b).to_dict()
                d["bootstrap"] = stats.paired_bootstrap(a, b)
                paired[ref][k][m] = d
    return {"per_method": summary, "paired": paired}


def _mean_sd(d: dict, spec: str) -> str:
    if d["mean"] != d["mean"]:
        return "—"
    return format(d["mean"], spec) if d["n"] == 1 else f"{d['mean']:{spec}} ± {d['sd']:{spec}}"


def _diff(d: dict, spec: str) -> str:
    if d["mean"] != d["mean"]:
        return "—"
    if d["n"] == 1:
        return f"{d['mean']:+{spec}}"
    cell = f"{d['mean']:+{spec}} [{d['low']:+{spec}}, {d['high']:+{spec}}]"
    return f"**{cell}**" if d["low"] > 0 or d["high"] < 0 else cell


def table(summary: dict, keys: list[str], names: dict | None = None) -> str:
    """Mean ± sd over seeds of every metric, one row per key."""
    names = names or {}
    lines = ["| method | " + " | ".join(c for _, c, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for k in keys:
        if k in summary["per_method"]:
            s = summary["per_method"][k]
            cells = [_mean_sd(s[m], spec) if m in s else "—" for m, _, spec in METRICS]
            lines.append(f"| {names.get(k, label(k))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_table(summary: dict, ref: str, keys: list[str]) -> str:
    """Paired differences (method - ref) with 95% t-intervals, one row per key."""
    lines = ["| method − " + label(ref) + " | " + " | ".join(c for _, c, _ in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for k in keys:
        if k in summary["paired"].get(ref, {}):
            d = summary["paired"][ref][k]
            lines.append(f"| {label(k)} | " + " | ".join(_diff(d[m], spec) for m, _, spec in METRICS) + " |")
    return "\n".join(lines)


def report(summary: dict, keys: list[str], n_seeds: int) -> str:
    """The markdown of every table: methods, ablation, paired differences against each reference."""
    main = [k for k in ("teacher", "warmup", *MAIN) if k in keys]
    abl = [k for k in ABLATION if k in keys]
    parts = [table(summary, main)]
    if len(abl) > 1:
        parts += ["Ablation (each of the first three rows adds one part; the last changes b's schedule):",
                  table(summary, abl, ABLATION_LABELS)]
    trained = [k for k in keys if k not in BASE]
    seeds = f"{n_seeds} seed{'' if n_seeds == 1 else 's'}"
    for ref in REFERENCES:
        if ref in summary["paired"]:
            parts += [f"Paired difference against {label(ref)} (mean over {seeds} of method − {label(ref)}, "
                      "95% t-interval; bold: the interval excludes 0):",
                      diff_table(summary, ref, [k for k in trained if k != ref])]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="methods (key: label):\n  " + "\n  ".join(m.describe() for m in METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--table", default=None, metavar="FILE",
                    help="markdown file the tables are written into, '' for none "
                         "(default docs/experiments.md; none with --quick)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                    help="do not start a seed that the projection says would end after this")
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    ap.add_argument("--reports", action="store_true",
                    help="also write OUT/reports.md: each seed's students side by side (docs/evaluation.md)")
    lab.add_run_args(ap)
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds: repeated seed in {args.seeds}")
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error("--time-budget: must be > 0 minutes")
    lab.resolve_run_args(ap, args, METHODS)
    if args.table is None:
        args.table = "" if args.quick else "docs/experiments.md"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = args.settings
    methods, seeds = args.methods, args.seeds
    estimate = estimate_minutes(settings, len(seeds), methods)
    print(f"{len(seeds)} seeds x {len(methods)} methods: estimated {estimate:.0f} min on a 2-core CPU "
          f"(~{estimate / len(seeds):.1f} min per seed)", flush=True)
    if args.estimate:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lab.use_compile_cache(out)
    heldout, heldout_file = lab.heldout_set(out, settings)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results, timings, skipped = {}, {}, []
    for i, seed in enumerate(seeds):
        elapsed = time.perf_counter() - t0
        if i and args.time_budget is not None and elapsed * (i + 1) / i > args.time_budget * 60:
            skipped = seeds[i:]
            log(f"time budget: {elapsed / 60:.1f} min for {i} seeds; seed {seed} would end past "
                f"{args.time_budget:g} min, so seeds {skipped} are skipped")
            break
        clock = lab.Clock()
        results[seed], timings[seed] = run_seed(out, seed, settings, methods, heldout, heldout_file, log)
        timings[seed].update(clock.lap("seed"))
        done = time.perf_counter() - t0
        log(f"seed {seed} done in {timings[seed]['seed_s'] / 60:.1f} min; projected total "
            f"{done / (i + 1) * len(seeds) / 60:.1f} min (estimate was {estimate:.0f})")
        _write_results(out, settings, seeds, methods, results, timings, done, estimate, skipped)
    wall = time.perf_counter() - t0
    keys = ["teacher", "warmup", *(m.key for m in methods)]
    summary = _write_results(out, settings, seeds, methods, results, timings, wall, estimate, skipped)
    text = report(summary, keys, len(results))
    print("\n" + text)
    print(f"\n{len(results)} seeds, {len(methods)} methods in {wall / 60:.1f} min -> {out / 'results.json'}")
    if args.reports:
        print(f"per-seed reports -> {write_reports(out, results, keys)}")
    if args.table:
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        s = settings
        lab.write_block(Path(args.table), "compare.py table",
                        f"`python experiments/compare.py {argv_text}`: seeds {sorted(results)}, {s.epochs} epochs "
                        f"over {s.distill_prompts} prompts (batch {s.global_batch}, lr {s.lr}), student warm-up "
                        f"{s.sft_steps} steps, {s.heldout} held-out prompts; mean ± standard deviation over seeds; "
                        f"{wall / 60:.1f} min.\n\n{text}")
    return 0


def write_reports(out: Path, results: dict, keys: list[str]) -> Path:
    """OUT/reports.md: per seed, every student's metrics in `protocols.report`'s comparison table."""
    fields = (("exact_match", "accuracy"), ("nll", "nll"), ("acceptance", "rate"))
    parts = []
    for seed in sorted(results):
        reports = [{"student": label(k), "metrics": {m: {f: results[seed][k][m]} for m, f in fields
                                                     if results[seed][k].get(m) is not None}}
                   for k in keys if k in results[seed]]
        parts.append(f"## seed {seed}\n\n" + protocol_report.comparison_markdown(reports))
    path = out / "reports.md"
    path.write_text("\n".join(parts))
    return path


def _write_results(out: Path, settings, seeds, methods, results, timings, wall, estimate, skipped) -> dict:
    keys = ["teacher", "warmup", *(m.key for m in methods)]
    summary = summarize(results, keys)
    data = {"settings": dataclasses.asdict(settings), "seeds": seeds, "skipped_seeds": skipped,
            "methods": {m.key: dataclasses.asdict(m) for m in methods},
            "labels": {k: label(k) for k in keys}, "results": results, "summary": summary,
            "timings": timings, "wall_s": round(wall, 1), "estimate_min": round(estimate, 1)}
    (out / "results.json").write_text(lab.to_json(data))
    return summary


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(f"error: {e}")
