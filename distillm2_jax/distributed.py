"""Multi-host start-up: `jax.distributed.initialize` from the environment or explicit flags.

On a TPU pod or under SLURM, `jax.distributed.initialize()` finds the coordinator itself. For
other clusters (and the local multi-process CPU test) pass the coordinator address, the number
of processes and this process's id, as flags or as the environment variables
DISTILLM2_COORDINATOR, DISTILLM2_NUM_PROCESSES and DISTILLM2_PROCESS_ID.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

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
    did) is declared dead and every other process exits non-zero (`start_watchdog`), rather
    than waiting forever in a collective; all processes must join within
    `initialization_timeout_s` (the config's `distributed` section).
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
    # JAX's own detector (it aborts the process with a C++ stack trace) is the backstop, set later
    # than the watchdog below, which exits first with one line naming the lost process.
    timeouts = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s) + max(10, int(heartbeat_timeout_s) // 2),
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
    if jax.process_count() > 1:
        start_watchdog(heartbeat_timeout_s)
    return jax.process_count() > 1


def start_watchdog(timeout_s: float, *, interval_s: float | None = None) -> threading.Thread | None:
    """Exit this process (status 1, one line on stderr) when another process of the run stops
    beating for `timeout_s`, or the coordinator (process 0) is unreachable.

    Every process bumps its own counter in the distributed runtime's key-value store every
    `interval_s` from a daemon thread (so long compiles or checkpoint writes do not stop it) and
    checks the others'. Without it, a survivor waits in its next collective until JAX's own
    heartbeat check aborts it with a stack trace. Stopped at exit, before JAX's shutdown barrier.
    """
    global _watchdog
    n, me = jax.process_count(), jax.process_index()
    if n == 1:
        return None
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    interval = interval_s or max(0.2, min(5.0, timeout_s / 5))
    stop = threading.Event()
    key = f"distillm2/heartbeat/{me}"

    def last_word(value: str) -> None:
        """Stop beating and leave `value` for the others: DONE (this process exited normally,
        others may still work) or FAILED + why (they stop too, now, instead of waiting)."""
        if stop.is_set():
            return
        stop.set()
        thread.join(timeout=2 * interval)
        try:
            client.key_value_set(key, value, allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the coordinator may be gone already)
            pass

    atexit.register(lambda: last_word(DONE))

    def die(message: str) -> None:
        if stop.is_set():
            return
        sys.stdout.flush()
        print(f"error: {message}; stopping process {me}. Rerun the same command on every host to resume from "
              f"the last complete checkpoint (distributed.heartbeat_timeout_s sets how long a silent process "
              f"is waited for)", file=sys.stderr, flush=True)
        os._exit(1)

    def beat() -> None:
        seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        count = 0
        while not stop.wait(interval):
            count += 1
            try:
                client.key_value_set(key, str(count), allow_overwrite=True)
                values = {p: _try_get(client, f"distillm2/heartbeat/{p}") for p in seen}
            except Exception as err:  # noqa: BLE001 (the runtime raises its own error types)
                die(f"lost contact with the coordinator, process 0 of {n} ({str(err).splitlines()[0][:200]})")
                return
            now = time.monotonic()
            for p, value in values.items():
                if value == DONE:
                    continue
                if value and value.startswith(FAILED):
                    die(f"process {p} of {n} stopped with an error ({value[len(FAILED):]})")
                    return
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > timeout_s:
                    die(f"process {p} of {n} sent no heartbeat for {now - seen[p][1]:.0f} s (it died, or its host did)")
                    return

    thread = threading.Thread(target=beat, name="distillm2-heartbeat", daemon=True)
    thread.start()
    _watchdog = (thread, timeout_s + 2 * interval, die, last_word)
    return thread


def exit_after_failure(message: str, status: int) -> None:
    """In a multi-process run, tell the other processes that this one stops with an error (a
    UserError on this host only, e.g. a file it cannot read), so that they exit now rather than
    wait for it, and exit with `status` without JAX's shutdown (it would wait for them, then
    abort). Returns when this is the only process."""
    if _watchdog is None:
        return
    _watchdog[3](FAILED + message.splitlines()[0][:300])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_watchdog = None
DONE = "done"  # the heartbeat value of a process that exited normally
FAILED = "failed: "  # ... of one that stopped with an error, then the error
# How a collective reports a peer that went away (gloo on CPU; the runtime's own status codes).
_PEER_FAILURE = ("Gloo", "Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` is a multi-process collective that failed because another process is gone."""
    return (_watchdog is not None and isinstance(err, jax.errors.JaxRuntimeError)
            and any(s in str(err) for s in _PEER_FAILURE))


def exit_after_peer_failure(err: BaseException) -> None:
    """Give the watchdog the time it needs to name the lost process (it exits the process), then
    exit with status 1 and one line; never return into JAX's shutdown, which would wait for the
    lost process and abort."""
    thread, wait_s, die, _ = _watchdog
    thread.join(timeout=wait_s)
    die(f"a collective with another process failed ({str(err).strip().splitlines()[0][:200]})")
    os._exit(1)


def _try_get(client, key: str) -> str | None:
    """The key's value, None when it is not set yet; other failures raise."""
    try:
        return client.key_value_try_get(key)
    except Exception as err:  # noqa: BLE001
        if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
            return None
        raise


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics, generated files and exports."""
    return jax.process_index() == 0
