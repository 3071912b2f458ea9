"""demo.report: the b readings panel of curves.png (values by hand, which reading a run used)."""
import json

import numpy as np

from distillm2_jax.objectives import curriculum as cur
from distillm2_jax.demo import report


def test_b_readings_by_hand():
    # 12 steps, E = 3 (4 steps per epoch), b0 = 0.5
    r = report.b_readings(12, 3)
    want = {
        "paper: T = run, e from 0 (trainer's 'paper')": [.5] * 7 + [7 / 12, 8 / 12, 9 / 12, 10 / 12, 11 / 12],
        "paper: T = epoch, e from 0": [.5, .5, .5, .75, .5, 1 / 3 + .25, 1 / 3 + .5, 1, 2 / 3, 2 / 3 + .25, 1, 1],
        "paper literal: T = epoch, e from 1": [.5, 1 / 3 + .25, 1 / 3 + .5, 1, 2 / 3, 2 / 3 + .25, 1, 1] + [1] * 4,
        "authors' code: linear 0.5 -> 0.75": [.5 + .25 * min(1, s / 6) for s in range(12)],
        "constant": [.5] * 12,
    }
    assert list(r) == list(want)
    for name, values in want.items():
        np.testing.assert_allclose(r[name], values, rtol=1e-6, err_msg=name)


def _run_dir(tmp_path, schedule: str, steps=12, epochs=3):
    d = tmp_path / schedule
    d.mkdir()
    spe = steps // epochs
    lines = []
    for s in range(steps):
        b = float(cur.b_schedule(schedule, step=s, total_steps=steps, epoch=s // spe, num_epochs=epochs,
                                 steps_per_epoch=spe))
        lines.append(json.dumps({"step": s + 1, "epoch": s // spe + 1, "beta": b, "loss": 1.0 / (s + 1),
                                 "skl": 0.5, "srkl": 0.4, "lr": 1e-3, "alpha_mean": 0.1}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "config.yaml").write_text("objective:\n  beta: 0.5\n")
    return d


def test_the_reading_a_run_used_is_found_and_drawn(tmp_path):
    from distillm2_jax.train.metrics import read_metrics

    paper, linear = _run_dir(tmp_path, "paper"), _run_dir(tmp_path, "linear")
    assert report.readings_used(read_metrics(paper)) == ["paper: T = run, e from 0 (trainer's 'paper')"]
    assert report.readings_used(read_metrics(linear)) == ["authors' code: linear 0.5 -> 0.75"]
    png = report.plot_curves({"distillm2": paper, "kd": linear}, tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
