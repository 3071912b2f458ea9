"""Training metrics: a JSONL + TensorBoard writer, FLOPs per token and MFU.

`MetricsWriter(run_dir)` appends one JSON object per logged step to `run_dir/metrics.jsonl`
and, with tensorboardX installed, writes the same scalars to `run_dir/tensorboard/`. Only
process 0 writes by default. A line looks like

    {"step": 10, "loss": 0.52, "skl": 0.31, "lr": 4.9e-05, "mfu": null, "time": 1767225600.123}

Values are plain JSON: ints stay ints, floats (also numpy/JAX scalars) are floats, `None` is
`null`, and the non-finite floats NaN, +inf, -inf are written as the strings "nan", "inf",
"-inf" (standard JSON has no NaN); `read_metrics` turns them back into floats.

FLOPs follow the usual dense-transformer estimate (Kaplan et al. 2020; PaLM, Chowdhery et al.
2022, appendix B): per token, 2 FLOPs per matmul parameter forward and 4 backward, plus the
attention score/value matmuls 4 * L * Hq * D * T forward (times 3 with backward); see
`flops_per_token`.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distillm2_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

__all__ = [
    "METRICS_FILE", "MetricsWriter", "PEAK_BF16_FLOPS", "TENSORBOARD_DIR", "attention_flops_per_token",
    "flops_per_token", "lora_params", "matmul_params", "mfu", "peak_flops", "peak_flops_per_device",
    "read_metrics", "read_tensorboard_scalars", "to_float",
]


# ----------------------------------------------------------------------------- values

def _json_value(key: str, value: Any):
    """A JSON-ready value: bool/int/float/str/None; 1-element arrays unwrapped; NaN/inf as strings."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / JAX arrays and scalars
        if math.prod(value.shape) != 1:
            raise TypeError(f"metric {key!r}: expected a scalar, got an array of shape {tuple(value.shape)}")
        kind = getattr(value.dtype, "kind", "f")
        scalar = value.reshape(()) if value.shape else value
        if kind == "b":
            return bool(scalar)
        value = int(scalar) if kind in "iu" else float(scalar)  # float() also takes bfloat16
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(value)
    raise TypeError(f"metric {key!r}: expected a number, string, bool or None, got {type(value).__name__}")


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_float(value: Any) -> float | None:
    """A metric value as a float for plotting (None/"nan" -> nan), or None if not numeric."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return None


# ----------------------------------------------------------------------------- writer

class MetricsWriter:
    """Append metrics to `run_dir/metrics.jsonl` (and TensorBoard scalars) on process 0.

    `log(step, {"loss": ..., ...})` writes one line and flushes it. Use as a context manager
    or call `close()`. `enabled` defaults to `jax.process_index() == 0`; when disabled every
    call is a no-op. A partial last line left by a crash is removed when the file is reopened,
    so a resumed run appends cleanly (`read_metrics` keeps the latest value per step).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb_pending = False
        if tensorboard:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                warnings.warn("tensorboardX is not installed: TensorBoard logging is off "
                              "(metrics.jsonl is still written)", stacklevel=2)
            else:
                self._tb_pending = True  # opened at the first log(), see _open_tensorboard

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / TENSORBOARD_DIR

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write {"step": step, **metrics, "time": unix seconds} (a `step` key in metrics is ignored)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsWriter is closed")
        step = int(step)
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if key != "step":
                record[str(key)] = _json_value(str(key), value)
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb_pending:
            self._open_tensorboard(step)
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "time") or value is None:  # null: not available (e.g. mfu on CPU)
                    continue
                number = to_float(value)
                if number is not None:
                    self._tb.add_scalar(key, number, step)
            self._tb.flush()

    def _open_tensorboard(self, first_step: int) -> None:
        """Open the event writer; when resuming into a run that has events, TensorBoard is told
        (purge_step) to drop the old events from `first_step` on, like read_metrics does."""
        from tensorboardX import SummaryWriter

        logdir = self.run_dir / TENSORBOARD_DIR
        existing = len(list(logdir.glob("events.out.tfevents.*")))
        # event files are named by the second they were opened: a suffix keeps a quick restart
        # from overwriting the previous file
        self._tb = SummaryWriter(logdir=str(logdir), flush_secs=30, filename_suffix=f".{existing}",
                                 purge_step=first_step if existing else None)
        self._tb_pending = False

    def close(self) -> None:
        self._tb_pending = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------- reader

def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or of a run folder holding one), in step order.

    "nan"/"inf"/"-inf" strings become floats. Steps must increase; when a step repeats or
    goes back (a run resumed from an earlier checkpoint), the later lines win: records with
    a larger step are dropped and a record with the same step is updated.
    Raises UserError naming the file and line for a missing file or a malformed line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file (metrics.jsonl is written by training)")
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            step = obj.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise UserError(f"{path}:{lineno}: 'step' is missing or not an integer")
            obj = {k: (_NONFINITE[v] if isinstance(v, str) and v in _NONFINITE else v) for k, v in obj.items()}
            while records and records[-1]["step"] > step:
                records.pop()
            if records and records[-1]["step"] == step:
                records[-1].update(obj)
            else:
                records.append(obj)
    return records


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar event in `logdir` (files in name order; purge
    markers are not applied). Needs tensorboardX's protos.

    A small TFRecord reader (length, CRC, payload, CRC) so reading back needs neither
    TensorFlow nor TensorBoard.
    """
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = file.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:
                break
            event = Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


# ----------------------------------------------------------------------------- FLOPs

def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: attention, MLP and the output head.

    The embedding lookup is a gather (no FLOPs); a tied head counts once, as the head.
    Norms and biases are negligible and left out.
    """
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o; k, v
    return cfg.num_layers * (attn + 3 * h * i) + h * cfg.output_vocab


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs of the attention scores and weighted values for one token.

    2 * Hq * D for q.k and 2 * Hq * D for p.v per attended position, counted over the whole
    sequence (T = seq_len; no causal halving, as in PaLM's 12 L H Q T), or over the window of
    a sliding-window layer (min(T, window)).
    """
    windows = tuple(cfg.layer_windows) or (0,) * cfg.num_layers
    span = sum(min(seq_len, w) if w else seq_len for w in windows)
    return 4.0 * cfg.num_heads * cfg.head_dim * span


def lora_params(cfg, rank: int, targets: Sequence[str] = LORA_TARGETS) -> int:
    """Parameters of LoRA adapters (A and B) of the given rank on `targets`."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    dims = {"q": (h, cfg.num_heads * d), "k": (h, cfg.num_kv_heads * d), "v": (h, cfg.num_kv_heads * d),
            "o": (cfg.num_heads * d, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    return cfg.num_layers * sum(rank * sum(dims[t]) for t in targets)


def flops_per_token(cfg, seq_len: int, *, trainable: bool = True, lora_rank: int = 0,
                    lora_targets: Sequence[str] = LORA_TARGETS) -> float:
    """Model FLOPs per token of a forward (+ backward) pass of a decoder (`models.ModelConfig`).

    With N = `matmul_params(cfg)` and A = `attention_flops_per_token(cfg, seq_len)`:
      forward only (trainable=False, e.g. the teacher):  2 N + A
      training every weight (trainable=True):           6 N + 3 A
      training LoRA adapters of rank r (lora_rank=r):   4 N + 3 A + 6 N_lora
    (the frozen base weights still pass gradients back to earlier layers: 2 N forward + 2 N
    backward, but no weight gradients; N_lora = `lora_params`). Recomputation (remat) is not
    counted: this is model FLOPs, the numerator of MFU.
    """
    n, a = matmul_params(cfg), attention_flops_per_token(cfg, seq_len)
    n_lora = lora_params(cfg, lora_rank, lora_targets) if lora_rank else 0
    if not trainable:
        return 2.0 * (n + n_lora) + a
    if lora_rank:
        return 4.0 * n + 3.0 * a + 6.0 * n_lora
    return 6.0 * n + 3.0 * a


# Peak dense (non-sparse) bf16 matmul FLOP/s of one device, matched in order against the
# lower-cased `jax.Device.device_kind` (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite").
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 989.4e12),
    (("h100", "pcie"), 756.0e12),
    (("h100", "nvl"), 835.0e12),
    (("h100",), 989.4e12),      # SXM
    (("a100",), 312.0e12),
    (("tpu v6 lite",), 918.0e12),   # v6e (Trillium)
    (("tpu v6e",), 918.0e12),
    (("tpu v5 lite",), 197.0e12),   # v5e
    (("tpu v5e",), 197.0e12),
    (("tpu v5p",), 459.0e12),
    (("tpu v5",), 459.0e12),        # v5p reports "TPU v5"
    (("tpu v4",), 275.0e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind, or None if unknown (CPU, other GPUs)."""
    kind = device_kind.lower()
    for words, flops in PEAK_BF16_FLOPS:
        if all(w in kind for w in words):
            return flops
    return None


def peak_flops(devices: Iterable | None = None) -> float | None:
    """Summed peak bf16 FLOP/s of `devices` (default: all of `jax.devices()`); None if any is unknown."""
    if devices is None:
        import jax

        devices = jax.devices()
    total = 0.0
    for device in devices:
        per = peak_flops_per_device(getattr(device, "device_kind", str(device)))
        if per is None:
            return None
        total += per
    return total or None


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: tokens/s * FLOPs/token / peak FLOP/s (all over the same devices).

    Returns None (logged as null) when the peak is unknown, e.g. on CPU.
    """
    if peak_flops is None or peak_flops <= 0:
        return None
    return float(tokens_per_second) * float(flops_per_token) / float(peak_flops)
