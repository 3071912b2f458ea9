"""Per-device hardware figures the plan is checked against: named presets and custom values.

Public per-chip figures (dense bf16 matmul peak, no sparsity): HBM in GiB per device, peak in
TFLOP/s per device, memory bandwidth in TB/s (10^12 bytes/s) per device.
"""
from __future__ import annotations

import dataclasses

from distillm2_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    hbm_gib: float | None          # memory per device
    peak_tflops: float | None      # dense bf16 TFLOP/s per device
    bandwidth_tbs: float | None    # HBM TB/s per device


PRESETS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h100-80gb", 80.0, 989.0, 3.35),    # H100 SXM
    Hardware("a100-80gb", 80.0, 312.0, 2.0),     # A100 SXM 80GB
    Hardware("tpu-v5e", 16.0, 197.0, 0.82),      # TPU v5e (v5 lite), per chip
    Hardware("tpu-v4", 32.0, 275.0, 1.2),        # TPU v4, per chip
)}


def resolve(names: str | None = None, *, hbm_gib: float | None = None, peak_tflops: float | None = None,
            bandwidth_tbs: float | None = None) -> list[Hardware]:
    """The device kinds to report: the comma-separated presets in `names`, each with any of the
    given figures replacing its own; no names and some figures: one "custom" kind; nothing: an
    "unspecified" kind (memory and FLOPs only, no fit or times)."""
    custom = dict(hbm_gib=hbm_gib, peak_tflops=peak_tflops, bandwidth_tbs=bandwidth_tbs)
    for key, value in custom.items():
        if value is not None and not value > 0:
            raise UserError(f"--{key.replace('_', '-')}: must be positive, got {value}")
    given = {k: float(v) for k, v in custom.items() if v is not None}
    if not names:
        return [Hardware("custom" if given else "unspecified", **{**dict.fromkeys(custom), **given})]
    kinds = []
    for name in (n.strip().lower() for n in names.split(",") if n.strip()):
        if name not in PRESETS:
            raise UserError(f"--hardware: unknown preset '{name}' (choose from {', '.join(PRESETS)})")
        kinds.append(dataclasses.replace(PRESETS[name], **given))
    if not kinds:
        raise UserError(f"--hardware: no preset given (choose from {', '.join(PRESETS)})")
    return kinds
