"""`distillm2 plan`: will a config fit a mesh, and how long will a step take? (docs/plan.md)

    from distillm2_jax import config, planning
    cfg = config.load("configs/qwen2.5-7b_to_1.5b.yaml", ["model.teacher=...", "model.student=..."])
    rows = planning.plan(cfg, devices=8, hardware="h100-80gb")     # one dict per device kind
    print(planning.format_report(rows))

Modules (one job each): `abstract` (the run's programs on abstract sharded arrays: the train
step as `Trainer.compile_step` builds it, the sampler's programs), `costs` (XLA's cost
analysis with loops counted by their trip counts), `measure` (per-device bytes and FLOPs of
those programs: `Plan`), `hardware` (device presets), `estimate` (fit, roofline times,
suggestions), `report` (the table), `devices` (N devices here or in a subprocess).
Only each model folder's config.json is read; no weights are loaded.
"""
from __future__ import annotations

from distillm2_jax.planning import devices as devices_lib
from distillm2_jax.planning.estimate import estimate
from distillm2_jax.planning.hardware import PRESETS, Hardware, resolve
from distillm2_jax.planning.measure import Plan, measure
from distillm2_jax.planning.report import format_report

__all__ = ["PRESETS", "Hardware", "Plan", "estimate", "format_report", "measure", "measure_on", "plan", "resolve"]


def measure_on(cfg, devices: int, *, generation: bool = True) -> Plan:
    """The `Plan` of `cfg` on `devices` devices: here when this process has that many (accelerators
    first, then CPU devices), else in a subprocess with that many fake CPU devices."""
    if devices < 1:
        from distillm2_jax.errors import UserError
        raise UserError(f"--devices: must be at least 1, got {devices}")
    found = devices_lib.local_devices(devices)
    if found is not None:
        return measure(cfg, found, generation=generation)
    return Plan.from_dict(devices_lib.in_subprocess(cfg.model_dump(mode="json"), devices, generation=generation))


def plan(cfg, devices: int, hardware: str | None = None, *, hbm_gib: float | None = None,
         peak_tflops: float | None = None, bandwidth_tbs: float | None = None,
         generation: bool = True) -> list[dict]:
    """One row per device kind (`hardware`: comma-separated presets of `PRESETS`; the figures
    replace a preset's or make a "custom" kind): `estimate`'s keys, e.g. params_bytes,
    optimizer_bytes, teacher_bytes, temp_bytes, kv_cache_bytes, total_bytes, flops_per_step, fits."""
    kinds = resolve(hardware, hbm_gib=hbm_gib, peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs)
    measured = measure_on(cfg, devices, generation=generation)
    return [estimate(measured, hw, cfg) for hw in kinds]
