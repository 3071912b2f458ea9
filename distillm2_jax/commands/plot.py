"""`distillm2 plot RUN_DIR`: training curves from a run's metrics.jsonl, as one PNG.

One panel per key (keys joined with `+` share a panel); by default the panels of the keys
the run logged among: loss (with eval_loss), skl, srkl, fkl, rkl, jsd, nll, alpha_mean /
alpha_min / alpha_max together, beta, lr, grad_norm, tokens_per_s, mfu. Without any of those,
every numeric key is drawn.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

from distillm2_jax.errors import UserError

# (panel title, series); a panel is drawn when at least one of its series was logged.
DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval_loss")),
    ("skl", ("skl",)),
    ("srkl", ("srkl",)),
    ("fkl", ("fkl",)),
    ("rkl", ("rkl",)),
    ("jsd", ("jsd",)),
    ("nll", ("nll",)),
    ("alpha", ("alpha_mean", "alpha_min", "alpha_max")),
    ("beta", ("beta",)),
    ("lr", ("lr",)),
    ("grad_norm", ("grad_norm",)),
    ("tokens_per_s", ("tokens_per_s",)),
    ("mfu", ("mfu",)),
)
_NOT_CURVES = ("step", "time", "epoch")


def register(subparsers) -> None:
    """Add the `plot` subcommand to the CLI."""
    p = subparsers.add_parser("plot", help="plot training curves from a run's metrics.jsonl",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (or a metrics.jsonl file)")
    p.add_argument("--out", metavar="FILE.png", help="image to write (default: RUN_DIR/metrics.png)")
    p.add_argument("--keys", metavar="K1,K2+K3,...",
                   help="comma-separated metric keys, one panel each; join keys with + to share a panel")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distillm2_jax.train.metrics import METRICS_FILE, read_metrics

    source = Path(args.run_dir)
    run_dir = source if source.is_dir() else source.parent
    out = Path(args.out) if args.out else run_dir / "metrics.png"
    keys = None if args.keys is None else [k.strip() for k in args.keys.split(",") if k.strip()]
    records = read_metrics(source)
    where = source / METRICS_FILE if source.is_dir() else source
    panels = choose_panels(records, keys, where=str(where))
    plot_panels(records, panels, out)
    print(f"distillm2 plot: {len(panels)} panel(s), {len(records)} logged steps -> {out}")
    return 0


def _numeric_keys(records: Sequence[dict]) -> list[str]:
    """Keys with at least one logged number (null-only keys such as mfu on CPU are left out)."""
    from distillm2_jax.train.metrics import to_float

    seen: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if (key not in _NOT_CURVES and value is not None and not isinstance(value, str)
                    and to_float(value) is not None):
                seen.setdefault(key, None)
    return list(seen)


def choose_panels(records: Sequence[dict], keys: Sequence[str] | None = None, *,
                  where: str = "metrics") -> list[tuple[str, tuple[str, ...]]]:
    """[(title, series keys)] to draw: the requested keys, or the defaults that were logged."""
    available = _numeric_keys(records)
    if not records:
        raise UserError(f"{where}: no metrics logged yet")
    if keys is None:
        panels = [(title, tuple(k for k in series if k in available)) for title, series in DEFAULT_PANELS]
        panels = [(t, s) for t, s in panels if s]
        return panels or [(k, (k,)) for k in available]
    panels = []
    for spec in keys:
        series: list[str] = []
        for key in (k.strip() for k in spec.split("+") if k.strip()):
            if key in available:
                series.append(key)
                continue
            expanded = [f"{key}_{s}" for s in ("mean", "min", "max") if f"{key}_{s}" in available]
            if not expanded:
                listed = ", ".join(available) or "none"
                raise UserError(f"{where}: no numeric metric '{key}' (available: {listed})")
            series.extend(expanded)
        if series:
            panels.append((spec, tuple(series)))
    if not panels:
        raise UserError("--keys: no keys given")
    return panels


def plot_panels(records: Sequence[dict], panels: Sequence[tuple[str, Sequence[str]]],
                out: str | os.PathLike) -> Path:
    """Draw the panels (x = step) into a PNG with matplotlib's Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from distillm2_jax.train.metrics import to_float

    cols = 1 if len(panels) <= 3 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 2.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, panels):
        for key in series:
            points = [(r["step"], to_float(r[key])) for r in records if key in r]
            points = [(s, v) for s, v in points if v is not None]
            ax.plot([s for s, _ in points], [v for _, v in points], label=key, linewidth=1.2,
                    marker="." if len(points) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for i, ax in enumerate(axes):
        if i >= len(panels):
            ax.set_visible(False)
        elif i >= len(panels) - cols:
            ax.set_xlabel("step")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
