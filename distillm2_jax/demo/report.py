"""The demo's outputs: the results table (text and markdown) and the training-curve PNG."""
from __future__ import annotations

import os
from pathlib import Path

NAMES = {"distillm2": "DistiLLM-2", "kd": "KD", "seqkd": "SeqKD", "gkd": "GKD", "distillm": "DistiLLM",
         "rkl": "RKL", "sft": "SFT", "dpkd": "DPKD"}


def _fmt(row: dict, key: str, spec: str) -> str:
    v = row.get(key)
    return "—" if v is None else format(v, spec)


def table(rows: dict[str, dict]) -> str:
    """A fixed-width table: model, exact match (overall and per skill), NLL, acceptance rate."""
    skills = sorted({s for r in rows.values() for s in r.get("per_skill", {})})
    head = ["model", "exact match", *skills, "NLL (teacher resp.)", "acceptance (draft)"]
    body = [[name, _fmt(r, "exact_match", ".3f"), *(format(r["per_skill"].get(s, float("nan")), ".3f")
                                                    for s in skills),
             _fmt(r, "nll", ".4f"), _fmt(r, "acceptance", ".3f")] for name, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in body)])


def markdown(results: dict, text_table: str) -> str:
    """results.md: the table, how it was measured, and where everything is."""
    s = results["settings"]
    lines = [
        "# distillm2 demo results", "",
        f"Held-out prompts: {s['heldout']} (never in a training split). Exact match: greedy decoding, "
        "answer checked exactly. NLL: mean per token of the teacher's sampled responses to the held-out "
        "prompts (lower is better). Acceptance: probability that speculative sampling accepts a token "
        "drafted by the model for the teacher, sum_v min(p, q), on those responses.", "",
        "```", text_table, "```", "",
        f"Distillation: {s['epochs']} epochs over {s['distill_prompts']} prompts, batch {s['global_batch']}, "
        f"lr {s['lr']}, sampling temperature {s['temperature']}, top-p {s['top_p']}; student warm-up: {s['sft_steps']} steps on "
        f"{s['sft_examples']} ground-truth examples; seed {s['seed']}.", "",
        f"Export check: {results['export']}", "",
        f"Wall time: {results['wall_s']} s; per phase: {results['timings_s']}", "",
    ]
    return "\n".join(lines)


def plot_curves(run_dirs: dict[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """One PNG: each run's loss, DistiLLM-2's SKL/SRKL parts, and its a range and b per step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from distillm2_jax.train.metrics import read_metrics, to_float

    records = {name: read_metrics(Path(d)) for name, d in run_dirs.items()}
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()

    def series(recs, key):
        pts = [(r["step"], to_float(r.get(key))) for r in recs if r.get(key) is not None]
        return [p for p, _ in pts], [v for _, v in pts]

    for name, recs in records.items():
        axes[0].plot(*series(recs, "loss"), label=NAMES.get(name, name), linewidth=1.2)
    axes[0].set_title("training loss (each objective's own scale)")
    for name, recs in records.items():
        for key in ("skl", "srkl", "fkl"):
            x, y = series(recs, key)
            if y:
                axes[1].plot(x, y, label=f"{NAMES.get(name, name)} {key}", linewidth=1.2)
    axes[1].set_title("divergence parts")
    main = next(iter(records.values()))
    for key in ("alpha_min", "alpha_mean", "alpha_max"):
        x, y = series(main, key)
        if y:
            axes[2].plot(x, y, label=key, linewidth=1.2)
    axes[2].set_title(f"{NAMES.get(next(iter(records)), '')} skew a (curriculum from epoch 2)")
    x, y = series(main, "beta")
    axes[3].plot(x, y, label="b", linewidth=1.2)
    x, y = series(main, "lr")
    if y:
        ax2 = axes[3].twinx()
        ax2.plot(x, y, color="gray", linestyle="--", linewidth=1.0, label="lr")
        ax2.set_ylabel("lr")
    axes[3].set_title("b (weight of SRKL) and learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    out = Path(out)
    fig.savefig(out, format="png", dpi=100)
    return out
