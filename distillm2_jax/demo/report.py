"""The demo's outputs: the results table (text and markdown) and the training-curve PNG."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distillm2_jax import objectives
from distillm2_jax.objectives import curriculum as cur
from distillm2_jax.train.metrics import read_metrics, to_float

def label(name: str) -> str:
    """How tables and plots name an objective (its registry label), or `name` itself."""
    return objectives.REGISTRY[name].label if name in objectives.REGISTRY else name


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


def b_readings(total_steps: int, num_epochs: int, b0: float = 0.5) -> dict[str, "np.ndarray"]:
    """b at optimizer steps 0 .. total_steps - 1 under each reading of the b schedule.

    The paper's printed rule b = clip(e/E + tau/T, b0, 1) read three ways (`curriculum.b_paper`;
    docs/experiments.md, "The b schedule: readings"), the authors' code ramp and a constant b.
    The first key is the trainer's `paper` schedule.
    """
    spe = max(total_steps // num_epochs, 1)
    step = np.arange(total_steps)
    epoch = np.minimum(step // spe, num_epochs - 1)
    paper = dict(steps_per_epoch=spe, b0=b0)
    curves = {
        "paper: T = run, e from 0 (trainer's 'paper')": cur.b_paper(step, total_steps, epoch, num_epochs, **paper),
        "paper: T = epoch, e from 0": cur.b_paper(step, total_steps, epoch, num_epochs, period="epoch", **paper),
        "paper literal: T = epoch, e from 1": cur.b_paper(step, total_steps, epoch, num_epochs, period="epoch",
                                                          first_epoch=1, **paper),
        "authors' code: linear 0.5 -> 0.75": cur.b_linear(step, total_steps, b0=b0),  # b_end as the trainer
        "constant": np.full(total_steps, b0),
    }
    return {k: np.asarray(v, np.float64) for k, v in curves.items()}


def _run_b0(run_dir) -> float:
    """objective.beta (b0) of a run folder's config.yaml; the default 0.5 when it cannot be read."""
    try:
        import yaml

        return float(yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["objective"]["beta"])
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return 0.5


def _logged_b(records: list[dict]) -> tuple[list[tuple[int, float]], int]:
    """(step, b) of every logged record, and the run's number of epochs."""
    logged = [(int(r["step"]), to_float(r["beta"])) for r in records if r.get("beta") is not None]
    return logged, max((int(r.get("epoch", 1)) for r in records), default=1)


def readings_used(records: list[dict], b0: float = 0.5) -> list[str]:
    """The names of `b_readings` whose b equals the b a run logged at every logged step.

    A record's step k is optimizer step k - 1 (b is computed before the update); the run's
    length is its last logged step (the trainer logs the last step of every epoch).
    """
    logged, epochs = _logged_b(records)
    total = max((s for s, _ in logged), default=0)
    if total < 1:
        return []
    return [name for name, b in b_readings(total, epochs, b0).items()
            if all(abs(b[s - 1] - v) < 1e-5 for s, v in logged)]


def _plot_b_readings(ax, records: list[dict], b0: float, title: str) -> None:
    """Every reading's b over the run's steps; the reading(s) equal to the run's logged b are marked."""
    logged, epochs = _logged_b(records)
    total = max((s for s, _ in logged), default=0)
    if total < 1:
        ax.set_title("b readings (no steps logged)")
        return
    used = readings_used(records, b0)
    x = np.arange(1, total + 1)              # logged step k is optimizer step k - 1
    styles = ("-", "--", ":", "-.", (0, (6, 2, 1, 2)))
    for i, (name, b) in enumerate(b_readings(total, epochs, b0).items()):
        # decreasing widths and distinct dashes keep overlapping readings visible
        ax.plot(x, b, linewidth=5.0 - 0.9 * i, linestyle=styles[i % len(styles)], alpha=0.85,
                label=name + ("  <- this run" if name in used else ""))
    ax.plot(*zip(*logged), "k.", markersize=3, label="b logged by the run")
    for e in range(1, epochs):
        ax.axvline(e * total / epochs + 0.5, color="gray", linewidth=0.8, alpha=0.6)
    ax.set_ylim(0.45, 1.05)
    ax.set_title(f"{title}: b under each reading of the schedule (E = {epochs})"
                 + ("" if used else "; the run's logged b matches none of them"))


def plot_curves(run_dirs: dict[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """One PNG: each run's loss, DistiLLM-2's SKL/SRKL parts, its a range and b per step, and the
    b curve of every reading of the schedule over the first run's steps (the one it used marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = {name: read_metrics(Path(d)) for name, d in run_dirs.items()}
    fig = Figure(figsize=(12, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplot_mosaic([["loss", "parts"], ["alpha", "b"], ["readings", "readings"]])
    axes = [panels[k] for k in ("loss", "parts", "alpha", "b", "readings")]

    def series(recs, key):
        pts = [(r["step"], to_float(r.get(key))) for r in recs if r.get(key) is not None]
        return [p for p, _ in pts], [v for _, v in pts]

    for name, recs in records.items():
        axes[0].plot(*series(recs, "loss"), label=label(name), linewidth=1.2)
    axes[0].set_title("training loss (each objective's own scale)")
    for name, recs in records.items():
        for key in ("skl", "srkl", "fkl"):
            x, y = series(recs, key)
            if y:
                axes[1].plot(x, y, label=f"{label(name)} {key}", linewidth=1.2)
    axes[1].set_title("divergence parts")
    first = next(iter(records))
    main = records[first]
    for key in ("alpha_min", "alpha_mean", "alpha_max"):
        x, y = series(main, key)
        if y:
            axes[2].plot(x, y, label=key, linewidth=1.2)
    axes[2].set_title(f"{label(first)} skew a (curriculum from epoch 2)")
    x, y = series(main, "beta")
    axes[3].plot(x, y, label="b", linewidth=1.2)
    x, y = series(main, "lr")
    if y:
        ax2 = axes[3].twinx()
        ax2.plot(x, y, color="gray", linestyle="--", linewidth=1.0, label="lr")
        ax2.set_ylabel("lr")
    axes[3].set_title("b (weight of SRKL) and learning rate")
    _plot_b_readings(axes[4], main, _run_b0(run_dirs[first]), label(first))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if axes[4].get_legend_handles_labels()[0]:
        axes[4].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the crossing curves
    out = Path(out)
    fig.savefig(out, format="png", dpi=100)
    return out
