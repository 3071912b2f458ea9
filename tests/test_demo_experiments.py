"""experiments/compare.py and experiments/figure1b.py: method choice, summaries with paired intervals,
tables, the figure, the marker blocks (fast, on made-up results), and figure1b end to end (slow)."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from distillm2_jax import stats

_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _load("compare")
figure1b = _load("figure1b")
lab = sys.modules["demo_lab"]


def test_methods_by_key_or_label_and_a_clear_error(capsys):
    assert [m.key for m in compare.parse_args(["--methods", "DistiLLM-2", "kd"]).methods] == ["kd", "distillm2"]
    assert len(compare.parse_args([]).methods) == len(compare.METHODS) == 8
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "KD", "nope"])
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and all(m.key in err for m in compare.METHODS)
    with pytest.raises(SystemExit):
        figure1b.parse_args(["--methods", "KLD"])
    assert "choose from" in capsys.readouterr().err
    assert [m.key for m in figure1b.parse_args(["--methods", "cald", "SKL"]).methods] == ["skl", "cald"]
    # sizes: --set FIELD=VALUE of run.DemoSettings, checked
    args = compare.parse_args(["--quick", "--set", "distill_prompts=32", "epochs=3"])
    assert (args.settings.distill_prompts, args.settings.epochs, args.settings.global_batch) == (32, 3, 16)
    for bad in ("epochs=two", "seed=3", "nope=1", "epochs"):
        with pytest.raises(SystemExit):
            compare.parse_args(["--set", bad])
        assert "--set" in capsys.readouterr().err
    # a quick run does not overwrite the documented tables unless asked
    assert compare.parse_args(["--quick"]).table == "" and compare.parse_args([]).table == "docs/experiments.md"


def test_estimate_is_printed_and_grows_with_the_work(capsys):
    # The 90-minute target of the default run is a figure `--estimate` prints (docs/experiments.md
    # records it and its distance to the target), not a test: the estimate is a fit, not a timing.
    assert compare.main(["--estimate"]) == 0
    assert "5 seeds x 8 methods" in capsys.readouterr().out
    s = compare.run.DemoSettings()
    est = compare.estimate_minutes(s, 5, list(compare.METHODS))
    assert 0 < est
    assert compare.estimate_minutes(s, 6, list(compare.METHODS)) > est
    assert compare.estimate_minutes(dataclasses.replace(s, distill_prompts=4096), 5, list(compare.METHODS)) > est
    assert compare.estimate_minutes(s, 5, list(compare.METHODS)[:2]) < est


def _row(em, nll, own, acc=None):
    r = {"exact_match": em, "nll": nll, "own_nll": own}
    return r if acc is None else {**r, "acceptance": acc}


def test_summary_paired_differences_and_tables():
    results = {
        0: {"teacher": _row(1.0, 0.1, 0.1), "warmup": _row(0.1, 1.2, 0.9, 0.5), "kd": _row(0.1, 1.0, 0.8, 0.55),
            "distillm": _row(0.15, 1.3, 0.6, 0.6), "distillm2": _row(0.2, 1.2, 0.5, 0.62)},
        1: {"teacher": _row(1.0, 0.1, 0.1), "warmup": _row(0.2, 1.1, 0.9, 0.5), "kd": _row(0.2, 0.9, 0.7, 0.56),
            "distillm": _row(0.25, 1.2, 0.5, 0.61), "distillm2": _row(0.3, 1.1, 0.5, 0.63)},
        2: {"teacher": _row(1.0, 0.1, 0.1), "warmup": _row(0.2, 1.0, 0.9, 0.5), "kd": _row(0.2, 0.8, 0.7, 0.57),
            "distillm": _row(0.2, 1.1, 0.6, 0.62), "distillm2": {"diverged": "loss is nan"}},
    }
    keys = ["teacher", "warmup", "kd", "distillm", "distillm2"]
    summary = compare.summarize(results, keys)
    kd = summary["per_method"]["kd"]["nll"]
    assert kd["mean"] == pytest.approx(0.9) and kd["sd"] == pytest.approx(0.1) and kd["n"] == 3
    # DistiLLM - KD exact match: 0.05, 0.05, 0.0 -> mean 1/30, sd 0.0288675, t_{.975,2} = 4.3026527
    d = summary["paired"]["kd"]["distillm"]["exact_match"]
    half = 4.3026527 * 0.0288675 / math.sqrt(3)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((1 / 30, 1 / 30 - half, 1 / 30 + half), abs=1e-6)
    assert d == {**stats.paired_difference([0.15, 0.25, 0.2], [0.1, 0.2, 0.2]).to_dict(), "bootstrap": d["bootstrap"]}
    # a diverged seed makes that method's metrics NaN, shown as "—"; the teacher has no acceptance
    assert math.isnan(summary["paired"]["kd"]["distillm2"]["nll"]["mean"])
    text = compare.report(summary, keys, 3)
    assert "| KD | 0.167 ± 0.058 | 0.900 ± 0.100 | 0.733 ± 0.058 | 0.560 ± 0.010 |" in text
    assert "| teacher | 1.000 ± 0.000 | 0.100 ± 0.000 | 0.100 ± 0.000 | — |" in text
    assert "Paired difference against KD" in text and "Paired difference against DistiLLM" in text
    # DistiLLM - KD own NLL: -0.2, -0.2, -0.1 -> mean -0.167, interval below 0 -> bold
    assert "**-0.167 [" in text
    payload = json.loads(lab.to_json({"summary": summary}))   # NaN -> null: strict JSON
    assert payload["summary"]["paired"]["kd"]["distillm2"]["nll"]["mean"] is None


def test_write_block_replaces_only_between_markers(tmp_path):
    doc = tmp_path / "experiments.md"
    doc.write_text("# Title\n\nintro\n\n<!-- x table: start -->\nold\n<!-- x table: end -->\n\nafter\n")
    lab.write_block(doc, "x table", "new table")
    assert doc.read_text() == "# Title\n\nintro\n\n<!-- x table: start -->\nnew table\n<!-- x table: end -->\n\nafter\n"
    lab.write_block(doc, "y table", "other")      # absent markers: appended
    assert doc.read_text().endswith("<!-- y table: start -->\nother\n<!-- y table: end -->\n")
    assert "new table" in doc.read_text()


def _figure_results():
    methods = {m.key: {"key": m.key, "label": m.label, "objective": m.objective, "overrides": m.overrides}
               for m in figure1b.METHODS}
    rows = {"warmup": {"nll": 1.5, "own_nll": 0.9, "start_nll": 0.9}}
    for i, key in enumerate(methods):
        rows[key] = {"nll": 1.0 + 0.1 * i, "own_nll": 0.5 + 0.1 * i, "start_nll": 1.0 + i}
    rows["dpkd"] = {"nll": 20.0, "own_nll": 0.2, "start_nll": 91.0}
    return {"settings": {"seed": 0, "epochs": 2, "distill_prompts": 64, "heldout": 24}, "methods": methods,
            "rows": rows}


def test_figure1b_table_and_png(tmp_path):
    res = _figure_results()
    text = figure1b.table(res)
    for name in ("start (warm-up only)", "KL", "RKL", "SKL", "SRKL", "CALD", "DPKD"):
        assert f"| {name} |" in text
    assert "| SKL | distillm2, b = 0 | 1.200 | 0.700 | 3.000 | 2.69 |" in text
    res["rows"]["rkl"] = {"diverged": "loss is nan at step 3"}
    assert "| RKL | rkl | diverged | diverged | diverged | 2.90 |" in figure1b.table(res)
    png = figure1b.plot(res, tmp_path / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_objective_check_reads_b_and_the_parts(tmp_path):
    recs = [{"step": 1, "epoch": 1, "beta": 0.0, "loss": 0.7, "skl": 0.7, "srkl": 0.2},
            {"step": 2, "epoch": 1, "beta": 0.0, "loss": 0.5, "skl": 0.5, "srkl": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    check = figure1b.objective_check(tmp_path)
    assert check["beta_min"] == check["beta_max"] == 0.0 and check["max_abs_loss_minus_skl"] == 0.0
    assert check["max_abs_loss_minus_srkl"] == pytest.approx(0.5)


def test_epoch1_student_responses_are_shared_by_the_on_policy_methods(tmp_path, monkeypatch):
    """The first on-policy method samples them; later ones find them in their run folder before
    training starts; methods that train on teacher responses only get none."""
    seen = {}

    def fake_train(cfg, log):
        data = pathlib.Path(cfg.run_dir) / "data"
        seen[cfg.objective.name + str(cfg.objective.beta_schedule)] = sorted(p.name for p in data.glob("*")) \
            if data.exists() else []
        data.mkdir(parents=True, exist_ok=True)
        for name in ("teacher.jsonl", "student_epoch1.jsonl"):
            if not (data / name).exists():
                (data / name).write_text(f"{cfg.run_dir}\n")
                (data / (name + ".meta.json")).write_text("{}")
        return type("R", (), {"run_dir": cfg.run_dir})()

    monkeypatch.setattr(lab.api, "train", fake_train)
    start = lab.Start(tmp_path, lab.run.DemoSettings.quick(), None, None, [], tmp_path / "h.jsonl", tmp_path / "p.jsonl")
    for m in (lab.Method("kd", "KD", "kd"), lab.Method("a", "A", "distillm2"),
              lab.Method("b", "B", "distillm2", {"objective.beta_schedule": "constant"})):
        lab.train(start, m)
    assert seen == {"kdpaper": [], "distillm2paper": [],
                    "distillm2constant": ["student_epoch1.jsonl", "student_epoch1.jsonl.meta.json"]}
    assert start.student_epoch1 == tmp_path / "runs" / "a" / "data" / "student_epoch1.jsonl"
    assert (tmp_path / "runs" / "b" / "data" / "student_epoch1.jsonl").read_text() == f"{tmp_path / 'runs' / 'a'}\n"


TINY = ["sft_steps=5", "distill_prompts=32", "heldout=8", "max_new_tokens=12"]  # with --quick (batch 16)


@pytest.mark.slow
def test_figure1b_end_to_end(tmp_path):
    """Every objective from one start; SKL is CALD with b = 0 (loss = SKL), SRKL with b = 1 (loss = SRKL)."""
    doc = tmp_path / "experiments.md"
    doc.write_text("# E\n\n<!-- figure1b table: start -->\n<!-- figure1b table: end -->\n")
    out = tmp_path / "fig"
    assert figure1b.main(["--quick", "--set", *TINY, "--out", str(out), "--table", str(doc)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == ["warmup", "kl", "rkl", "skl", "srkl", "cald", "dpkd"]
    for key, row in res["rows"].items():
        if "diverged" not in row:
            assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("nll", "own_nll", "start_nll")), key
    skl, srkl = res["rows"]["skl"]["objective_check"], res["rows"]["srkl"]["objective_check"]
    assert skl["beta_min"] == skl["beta_max"] == 0.0 and skl["max_abs_loss_minus_skl"] < 1e-6
    assert srkl["beta_min"] == srkl["beta_max"] == 1.0 and srkl["max_abs_loss_minus_srkl"] < 1e-6
    cald = res["rows"]["cald"]["objective_check"]
    assert cald["beta_max"] > cald["beta_min"] == 0.5                     # the rising b of the default
    # the warm-up's own responses are the fixed "start" set
    assert res["rows"]["warmup"]["start_nll"] == res["rows"]["warmup"]["own_nll"]
    table = (out / "figure1b.md").read_text()
    assert table.strip() in doc.read_text() and "| CALD | distillm2 |" in table
    png = (out / "figure1b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    """Two seeds, three methods: every metric per row, paired intervals, the table between the
    markers; the second on-policy method reuses the first one's epoch-1 student responses."""
    doc = tmp_path / "experiments.md"
    doc.write_text("# E\n\nkeep\n\n<!-- compare.py table: start -->\nold\n<!-- compare.py table: end -->\n\nafter\n")
    out = tmp_path / "cmp"
    assert compare.main(["--quick", "--set", *TINY, "--seeds", "0", "1", "--methods", "kd", "DistiLLM-2",
                         "contrastive", "--out", str(out), "--table", str(doc)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and list(res["methods"]) == ["kd", "distillm2", "contrastive"]
    for seed in ("0", "1"):
        rows = res["results"][seed]
        assert list(rows) == ["teacher", "warmup", "kd", "distillm2", "contrastive"]
        runs = out / f"seed{seed}" / "runs"
        first, second = (runs / k / "data" / "student_epoch1.jsonl" for k in ("distillm2", "contrastive"))
        assert first.read_bytes() == second.read_bytes()
        assert not (runs / "kd" / "data" / "student_epoch1.jsonl").exists()    # KD samples no student
        for key in ("warmup", "kd", "distillm2", "contrastive"):
            assert all(np.isfinite(rows[key][m]) for m in ("exact_match", "nll", "own_nll", "acceptance")), key
            assert rows[key]["own_tokens"] > 0
        assert "train_cpu_s" in rows["kd"] and "seed_s" in res["timings"][seed]
    d = res["summary"]["paired"]["kd"]["distillm2"]["own_nll"]
    assert d["n"] == 2 and d["low"] <= d["mean"] <= d["high"]
    text = doc.read_text()
    assert text.startswith("# E\n\nkeep\n\n<!-- compare.py table: start -->\n`python experiments/compare.py --quick")
    assert "\nold\n" not in text and text.endswith("<!-- compare.py table: end -->\n\nafter\n")
    assert "| DistiLLM-2 |" in text and "Paired difference against KD (mean over 2 seeds" in text
