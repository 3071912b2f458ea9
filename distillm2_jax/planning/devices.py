"""Where the programs are compiled: N devices of this process, or a helper process with N
fake CPU devices.

A process fixes its device count when JAX's backend starts. `for_command_line` sets the CPU
device count (`jax_num_cpu_devices`) before that, so `distillm2 plan --devices N` compiles in
process. A Python caller whose process already has too few devices gets the plan from a
subprocess (`python -m distillm2_jax.planning`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; the plan travels back as JSON.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax

from distillm2_jax.errors import UserError

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def for_command_line(n: int) -> None:
    """Give this process at least n CPU devices, if its backend has not started yet."""
    if not _backends_started():
        jax.config.update("jax_num_cpu_devices", max(n, 1))


def local_devices(n: int) -> list | None:
    """n devices of this process: accelerators when there are enough, else CPU devices; None
    when neither has n."""
    devices = jax.devices()
    if len(devices) >= n:
        return devices[:n]
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:
        return None
    return cpus[:n] if len(cpus) >= n else None


def in_subprocess(config_dict: dict, n: int, *, generation: bool = True) -> dict:
    """The `measure.Plan` (as a dict) of a config computed in a fresh process with n fake CPU devices."""
    env = dict(os.environ)
    flags = _COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    request = json.dumps({"config": config_dict, "devices": n, "generation": generation})
    proc = subprocess.run([sys.executable, "-m", "distillm2_jax.planning"], input=request,
                          capture_output=True, text=True, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or proc.returncode not in (0, 2):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the planning subprocess failed (exit {proc.returncode}): {tail[0]}")
    if "error" in answer:
        raise UserError(answer["error"])
    return answer["plan"]
