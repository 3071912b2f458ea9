"""Multi-host start-up: `jax.distributed.initialize` from the environment or explicit flags.

On a TPU pod or under SLURM, `jax.distributed.initialize()` finds the coordinator itself. For
other clusters (and the local multi-process CPU test) pass the coordinator address, the number
of processes and this process's id, as flags or as the environment variables
DISTILLM2_COORDINATOR, DISTILLM2_NUM_PROCESSES and DISTILLM2_PROCESS_ID.
"""
from __future__ import annotations

import os

import jax

from distillm2_jax.errors import UserError

_initialized = False


def _cluster_detected() -> bool:
    env = os.environ
    return any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                  "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices_per_process: int | None = None,
               heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> bool:
    """Join the multi-process JAX runtime when asked or when a cluster is detected.

    Returns True when running multi-process. Safe to call twice. `cpu_devices_per_process`
    (or DISTILLM2_CPU_DEVICES) sets the CPU device count, for multi-process runs on CPU.
    A process that stops sending heartbeats for `heartbeat_timeout_s` (it died, or its host
    did) is declared dead and every other process exits non-zero, rather than waiting forever
    in a collective; all processes must join within `initialization_timeout_s`
    (the config's `distributed` section).
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    env = os.environ
    coordinator = coordinator or env.get("DISTILLM2_COORDINATOR")
    if num_processes is None and env.get("DISTILLM2_NUM_PROCESSES"):
        num_processes = int(env["DISTILLM2_NUM_PROCESSES"])
    if process_id is None and env.get("DISTILLM2_PROCESS_ID"):
        process_id = int(env["DISTILLM2_PROCESS_ID"])
    cpu = cpu_devices_per_process or (int(env["DISTILLM2_CPU_DEVICES"]) if env.get("DISTILLM2_CPU_DEVICES") else None)
    if cpu:
        jax.config.update("jax_num_cpu_devices", cpu)
    explicit = coordinator is not None
    timeouts = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                    initialization_timeout=int(initialization_timeout_s))
    if explicit:
        if num_processes is None or process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id "
                            "(or DISTILLM2_NUM_PROCESSES and DISTILLM2_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    elif _cluster_detected():
        jax.distributed.initialize(**timeouts)
    else:
        return False
    _initialized = True
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics, generated files and exports."""
    return jax.process_index() == 0
