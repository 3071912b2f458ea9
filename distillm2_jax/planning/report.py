"""The plan as text: one table per device kind (`--json` prints the rows of `estimate` instead)."""
from __future__ import annotations

from distillm2_jax.planning.estimate import human_flops, human_time

GIB = 2 ** 30

CPU_NOTE = ("note: compiled for fake CPU devices: temporaries are XLA:CPU's (GPU/TPU fuse and reuse buffers "
            "differently); weights, optimizer state, batch and KV cache are exact")


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.2f} MiB"


def format_row(row: dict) -> str:
    hw = row["hardware"]
    figures = []
    if row["hbm_gib"] is not None:
        figures.append(f"{row['hbm_gib']:g} GiB")
    if row["peak_tflops"] is not None:
        figures.append(f"{row['peak_tflops']:g} TFLOP/s")
    if row["bandwidth_tbs"] is not None:
        figures.append(f"{row['bandwidth_tbs']:g} TB/s")
    mesh = "x".join(str(s) for s in row["mesh_shape"])
    lines = [f"== {hw} ({', '.join(figures) or 'no hardware figures'}) x {row['devices']} devices, "
             f"mesh (data, fsdp, tensor) = {mesh}",
             "per device:",
             f"  student params   {_gib(row['params_bytes'])}   (trainable {_gib(row['trainable_bytes']).strip()})",
             f"  optimizer state  {_gib(row['optimizer_bytes'])}",
             f"  teacher          {_gib(row['teacher_bytes'])}",
             f"  batch            {_gib(row['batch_bytes'])}",
             f"  step temporaries {_gib(row['temp_bytes'])}",
             f"  KV cache         {_gib(row['kv_cache_bytes'])}",
             f"  train step peak  {_gib(row['train_bytes'])}",
             f"  generation peak  {_gib(row['generation_bytes'])}",
             f"  total (peak)     {_gib(row['total_bytes'])}"
             + ("" if row["fits"] is None else f"   -> {'fits' if row['fits'] else 'DOES NOT FIT'} in "
                                                 f"{row['hbm_gib']:g} GiB")]
    lines.append(f"train step: {human_flops(row['flops_per_step'])} per step (all devices; "
                 f"{human_flops(row['flops_per_step_per_device'])} per device, {row['tokens_per_step']} tokens)")
    if row["step_time_s"] is not None:
        lines.append(f"  predicted step time {human_time(row['step_time_s'])} ({row['step_bound']}-bound)")
    for g in row["generation"]:
        lines.append(f"generation ({g['model']}, {g['rows']} rows, prompt {g['prompt_length']}, "
                     f"{g['max_new_tokens']} new tokens): {human_flops(g['flops_per_token'])} per generated token")
        if g["batch_time_s"] is not None:
            lines.append(f"  predicted prefill {human_time(g['prefill_time_s'])} ({g['prefill_bound']}-bound), "
                         f"decode step {human_time(g['decode_step_time_s'])} ({g['decode_bound']}-bound), "
                         f"batch {human_time(g['batch_time_s'])}, {g['tokens_per_s']:.0f} tokens/s")
    if row["suggestions"]:
        lines.append("suggestion (re-run plan with these overrides to check):")
        lines += [f"  - {s}" for s in row["suggestions"]]
    return "\n".join(lines)


def format_report(rows: list[dict]) -> str:
    text = "\n\n".join(format_row(r) for r in rows)
    if rows and rows[0]["platform"] == "cpu":
        text += "\n\n" + CPU_NOTE
    return text
