"""The paper's Table 9 in miniature, on the embedded demo task: a 4-bit student recovered by distillation.

From one seed's common start (`demo_lab`: data, the warmed-up student, the teacher's held-out
responses), the rows are

* the teacher (reference) and the warmed-up student at full precision;
* the same student with its seven projections quantized (int4 by default, `models.quant`), no training;
* that quantized student recovered by KD and by DistiLLM-2: a frozen int4 base with LoRA adapters
  (`model.quantization.mode: qlora`, `lora.enabled: true`, the LoRA section's defaults) trained
  from the full-precision teacher with the demo's budget (same prompts, epochs, batch, lr);
* the DistiLLM-2 student exported (LoRA merged into the dequantized base) and quantized again
  with the same format: what serving it with int4 weights and no adapter gives.

Every row is scored like the demo (`demo.run.evaluate_model`): exact match (greedy), NLL of the
teacher's held-out responses and the acceptance rate as the teacher's speculative draft.

    python experiments/quantized_student.py [--out runs/quantized_student] [--bits 4] [--group-size 128]
                                            [--seed 0] [--quick] [--set FIELD=VALUE ...]

Writes OUT/results.json and prints the table (docs/quantization.md holds the figures of one run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_lab, also when loaded by file path

import demo_lab as lab  # noqa: E402

from distillm2_jax import api  # noqa: E402
from distillm2_jax.demo import run  # noqa: E402
from distillm2_jax.errors import UserError  # noqa: E402
from distillm2_jax.models import quant  # noqa: E402
from distillm2_jax.train.student import quantize_model  # noqa: E402

COLUMNS = (("exact_match", "exact match", "{:.3f}"), ("nll", "NLL teacher resp.", "{:.4f}"),
           ("acceptance", "acceptance", "{:.3f}"))


def methods(bits: int, group_size: int) -> list[lab.Method]:
    """The two recoveries: KD and DistiLLM-2 on the quantized base with LoRA."""
    q = {"model.quantization.mode": "qlora", "model.quantization.bits": bits,
         "model.quantization.group_size": group_size, "lora.enabled": True}
    return [lab.Method(f"int{bits}-kd", f"int{bits} + LoRA, KD", "kd", q),
            lab.Method(f"int{bits}-distillm2", f"int{bits} + LoRA, DistiLLM-2", "distillm2", q)]


def table(rows: dict) -> str:
    """The rows as a fixed-width text table (also valid inside a markdown code block)."""
    names = list(rows)
    width = max(len(n) for n in names + ["model"])
    widths = [max(len(c), 10) for _, c, _ in COLUMNS]
    head = "model".ljust(width) + "".join(f"  {c:>{w}}" for (_, c, _), w in zip(COLUMNS, widths))
    lines = [head, "-" * width + "".join("  " + "-" * w for w in widths)]
    for name in names:
        cells = []
        for (key, _, fmt), w in zip(COLUMNS, widths):
            value = rows[name].get(key)
            cells.append(f"  {'—' if value is None else fmt.format(value):>{w}}")
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def run_experiment(out: Path, settings: run.DemoSettings, *, bits: int = 4, group_size: int = 128,
                   log=print) -> dict:
    """Every row of the table (module docstring); writes OUT/results.json and returns it."""
    out.mkdir(parents=True, exist_ok=True)
    lab.use_compile_cache(out)
    spec = quant.QuantSpec(bits=bits, group_size=group_size)
    t_start = time.perf_counter()
    heldout, heldout_file = lab.heldout_set(out, settings)
    log(f"warm-up of the student ({settings.sft_steps} steps) and the teacher's held-out responses")
    start = lab.prepare_start(out / f"seed{settings.seed}", settings, heldout, heldout_file)
    timings = dict(start.timings)

    def score(name, model):
        clock = lab.Clock()
        row = run.evaluate_model(model, start.teacher, start.tokenizer, heldout, start.pairs)
        row.pop("samples", None)
        timings.update(clock.lap(f"eval {name}"))
        log(f"  {name}: exact match {row['exact_match']:.3f}, NLL {row['nll']:.4f}")
        return row

    rows = {"teacher": score("teacher", start.teacher)}
    student = start.student()
    rows["student, full precision (fp32)"] = score("student fp32", student)
    rows[f"student, int{bits} (no training)"] = score(f"student int{bits}", quantize_model(student, spec))
    for method in methods(bits, group_size):
        log(f"{method.label}: {settings.epochs} epochs from the int{bits} student")
        clock = lab.Clock()
        run_dir = lab.train(start, method)
        timings.update(clock.lap(f"train {method.key}"))
        merged = api.restore_student(run_dir)
        rows[f"student, {method.label}"] = score(method.key, merged)
        if method.objective == "distillm2":
            rows[f"student, {method.label}, merged + re-quantized int{bits}"] = score(
                f"{method.key} re-quantized", quantize_model(merged, spec))
    results = {"settings": dataclasses.asdict(settings), "bits": bits, "group_size": group_size,
               "rows": rows, "timings_s": timings, "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/quantized_student"))
    ap.add_argument("--bits", type=int, choices=quant.BITS, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="input features per scale (0: per column)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the demo's reduced sizes (a smoke test)")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="assignments",
                    help="change a demo size, e.g. --set distill_prompts=1024 (run.DemoSettings fields)")
    args = ap.parse_args(argv)
    try:
        settings = dataclasses.replace(lab.demo_settings(args.quick, args.assignments), seed=args.seed)
    except UserError as e:
        ap.error(f"--set: {e}")
    results = run_experiment(args.out, settings, bits=args.bits, group_size=args.group_size)
    print()
    print(table(results["rows"]))
    print(f"\nwall time {results['wall_s']:.0f} s; results -> {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
