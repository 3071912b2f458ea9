"""Figure 1(b) of DistiLLM-2 in miniature: which objective leaves the student likely on whose responses.

From one start (the warmed-up student of one seed, `demo_lab`), six students train with the same
budget on the demo task:

    KL    objective kd         forward KL(p || q) on the teacher's responses
    RKL   objective rkl        reverse KL(q || p) on the student's responses
    SKL   objective distillm2  constant b = 0, a = 0.1 fixed: (1 - b) SKL + b SRKL = SKL on the teacher's responses
    SRKL  objective distillm2  constant b = 1, a = 0.1 fixed: SRKL on the student's responses
    CALD  objective distillm2  the default (rising b, a curriculum): DistiLLM-2
    DPKD  objective dpkd       DPO-style margin of the student over the teacher (b = 0.1)

and each student's NLL per response token is measured on three sets of responses to the held-out
prompts: the teacher's sampled responses (the figure's "teacher-generated"), the student's own
sampled responses (`demo_lab.own_nll`), and the warmed-up student's sampled responses (one fixed
set for every method, the start's "student-generated" responses). The paper's DPKD collapse
(NLL 91 on student responses) shows on a fixed set: a student that pushes those responses down
scores them badly, while its own fresh samples can still look likely to it. A run whose loss turns
non-finite is reported as diverged.

    python experiments/figure1b.py [--seed 0] [--methods KEY ...] [--out runs/figure1b] [--quick]
                                   [--table [docs/experiments.md]]

Writes OUT/results.json, OUT/figure1b.md (the table) and OUT/figure1b.png (bars of the NLLs per
method); --table also writes the table between the `figure1b table` markers of the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_lab, also when loaded by file path
import demo_lab as lab  # noqa: E402

from distillm2_jax.demo import run  # noqa: E402
from distillm2_jax.errors import UserError  # noqa: E402

_FIXED = {"objective.beta_schedule": "constant", "objective.curriculum": False}
M = lab.Method
METHODS = (
    M("kl", "KL", "kd"),
    M("rkl", "RKL", "rkl"),
    M("skl", "SKL", "distillm2", {**_FIXED, "objective.beta": 0.0}),
    M("srkl", "SRKL", "distillm2", {**_FIXED, "objective.beta": 1.0}),
    M("cald", "CALD", "distillm2"),
    M("dpkd", "DPKD", "dpkd"),
)
# The paper's Figure 1(b) (Mistral-7B -> Danube2-1.8B), NLL on teacher responses, read from a text
# extraction of the figure (approximate; /docs/paper.md); only DPKD's student-response value is known.
PAPER_TEACHER_NLL = {"kl": 2.50, "rkl": 2.90, "skl": 2.69, "srkl": 2.79, "cald": 2.18, "dpkd": 20.29}
# result key, column, bar label
NLLS = (("nll", "NLL teacher resp. ↓", "the teacher's responses"), ("own_nll", "NLL own resp.", "its own responses"),
        ("start_nll", "NLL start's resp.", "the start student's responses"))
START = "start (warm-up only)"


def objective_check(run_dir: Path) -> dict:
    """b over the run and how far the loss is from each CALD part: SKL alone when b = 0, SRKL when b = 1."""
    from distillm2_jax.train.metrics import read_metrics, to_float

    recs = read_metrics(run_dir)
    out = {"beta_min": min(to_float(r["beta"]) for r in recs), "beta_max": max(to_float(r["beta"]) for r in recs)}
    for part in ("skl", "srkl"):
        if all(r.get(part) is not None for r in recs):
            out[f"max_abs_loss_minus_{part}"] = max(abs(to_float(r["loss"]) - to_float(r[part])) for r in recs)
    return out


def run_figure(out: Path, settings: run.DemoSettings, methods: list[lab.Method], log=print) -> dict:
    """Train every method from one start and measure the three NLLs; returns the results dict."""
    out.mkdir(parents=True, exist_ok=True)
    lab.use_compile_cache(out)
    t0 = time.perf_counter()
    heldout, heldout_file = lab.heldout_set(out, settings)
    start = lab.prepare_start(out / f"seed{settings.seed}", settings, heldout, heldout_file)
    student = start.student()
    warm = lab.own_nll(student, start, "warmup")   # its own responses are the fixed "start" set
    start_pairs = Path(warm["own_pairs"])

    def nlls(model, start, name):
        return {"nll": lab.nll(model, start, start.pairs), **lab.own_nll(model, start, name),
                "start_nll": lab.nll(model, start, start_pairs)}

    rows = {"warmup": {**warm, "nll": lab.nll(student, start, start.pairs), "start_nll": warm["own_nll"]}}
    for m in methods:
        r = rows[m.key] = lab.train_and_measure(start, m, nlls)
        if "diverged" in r:
            log(f"{m.label}: DIVERGED ({r['diverged']})")
            continue
        if m.objective == "distillm2":
            r["objective_check"] = objective_check(Path(r["run_dir"]))
        log(f"{m.label}: NLL teacher resp. {r['nll']:.4f}, own resp. {r['own_nll']:.4f}, "
            f"start's resp. {r['start_nll']:.4f} (train {r['train_s']:.0f} s)")
    return {"settings": dataclasses.asdict(settings), "methods": {m.key: dataclasses.asdict(m) for m in methods},
            "rows": rows, "timings": start.timings, "wall_s": round(time.perf_counter() - t0, 1)}


def _cell(row: dict, key: str) -> str:
    if "diverged" in row:
        return "diverged"
    v = row.get(key)
    return "—" if v is None or not math.isfinite(v) else f"{v:.3f}"


def table(results: dict) -> str:
    """Markdown: one row per student, the three NLLs and the paper's teacher-response NLL."""
    labels = {m["key"]: (m["label"], m["objective"], m["overrides"]) for m in results["methods"].values()}
    head = "| student | objective | " + " | ".join(c for _, c, _ in NLLS) + " | paper: teacher resp. (≈) |"
    lines = [head, "|---" * (len(NLLS) + 3) + "|"]
    for key, row in results["rows"].items():
        if key == "warmup":
            name, objective, paper = START, "—", "—"
        else:
            name, obj, over = labels[key]
            b = over.get("objective.beta")
            objective = f"{obj}, b = {b:g}" if b is not None else obj
            paper = f"{PAPER_TEACHER_NLL[key]:.2f}" if key in PAPER_TEACHER_NLL else "—"
        lines.append(f"| {name} | {objective} | " + " | ".join(_cell(row, k) for k, _, _ in NLLS) + f" | {paper} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Grouped bars: the three NLLs of every student (log scale when they span more than 30x)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["rows"]
    names = [START if k == "warmup" else results["methods"][k]["label"] for k in rows]
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(NLLS)
    finite = []
    for i, (key, _, what) in enumerate(NLLS):
        ys = [row.get(key, float("nan")) if "diverged" not in row else float("nan") for row in rows.values()]
        xs = [j + (i - (len(NLLS) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, ys, width, label=f"NLL of {what}")
        ax.bar_label(bars, labels=[f"{y:.2f}" if math.isfinite(y) else "" for y in ys], fontsize=7)
        finite += [y for y in ys if math.isfinite(y) and y > 0]
    if finite and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("NLL per response token (nats)")
    s = results["settings"]
    ax.set_title(f"Figure 1(b) in miniature: seed {s['seed']}, {s['epochs']} epochs over {s['distill_prompts']} "
                 f"prompts, {s['heldout']} held-out prompts", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=100)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="methods (key: label):\n  " + "\n  ".join(m.describe() for m in METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/figure1b")
    ap.add_argument("--table", nargs="?", const="docs/experiments.md", default=None, metavar="FILE",
                    help="also write the table into FILE (default docs/experiments.md) between its markers")
    lab.add_run_args(ap)
    args = ap.parse_args(argv)
    lab.resolve_run_args(ap, args, METHODS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(args.settings, seed=args.seed)
    out = Path(args.out)
    results = run_figure(out, settings, args.methods, log=lambda m: print(m, flush=True))
    text = table(results)
    (out / "results.json").write_text(lab.to_json(results))
    (out / "figure1b.md").write_text(text + "\n")
    png = plot(results, out / "figure1b.png")
    print("\n" + text + f"\n\n{results['wall_s'] / 60:.1f} min -> {out / 'results.json'}, {png}")
    if args.table:
        s = settings
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        lab.write_block(Path(args.table), "figure1b table",
                        f"`python experiments/figure1b.py {argv_text}`: seed {s.seed}, {s.epochs} epochs over "
                        f"{s.distill_prompts} prompts (batch {s.global_batch}, lr {s.lr}), student warm-up "
                        f"{s.sft_steps} steps, {s.heldout} held-out prompts; NLL per response token (nats); "
                        f"{results['wall_s'] / 60:.1f} min.\n\n{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(f"error: {e}")
