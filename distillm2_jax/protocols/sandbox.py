"""Run untrusted candidate programs (generated code) in a subprocess, with limits, and classify how
they ended: `passed`, `failed`, `timeout`, `memory` or `error`.

Each program gets (docs/evaluation.md, "Code", says what this does NOT protect against):

* its own temporary working directory (also HOME and TMPDIR), removed afterwards;
* a wall-clock timeout, after which its whole process group is killed, and a CPU-time limit
  (RLIMIT_CPU) as a backstop;
* an address-space limit (RLIMIT_AS: a memory bomb ends in MemoryError), a file-size limit
  (RLIMIT_FSIZE), no core dumps, few open files, and RLIMIT_NPROC so that fork fails for a
  non-root user (the kernel does not apply RLIMIT_NPROC to root);
* stdin closed (/dev/null), stdout and stderr to files inside its directory;
* an audit hook in the child (`sandbox_child`) that refuses writes outside the directory,
  process creation, signals to other processes, sockets and ctypes;
* when unprivileged user namespaces work (`unshare` from util-linux), new user, network, IPC and
  PID namespaces: no network interface but a downed loopback, and every process it starts dies
  with the namespace when the program ends or is killed. Without them, processes left behind are
  found by a marker in their environment and killed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "error")
_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_MARK_VAR = "DISTILLM2_SANDBOX"
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--ipc", "--pid", "--fork", "--kill-child"]
_namespaces_work: bool | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock seconds, address space (MiB), largest file written (MiB)."""
    timeout: float = 3.0
    memory_mb: int = 1024
    file_mb: int = 16
    isolation: str = "auto"   # "auto": namespaces when they work; "none": rlimits and the hook only
    audit_hook: bool = True   # False only to test the other layers on their own


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one program ended: status (one of STATUSES), a short detail, wall seconds."""
    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def namespaces_available() -> bool:
    """Whether `unshare` can create the user/network/PID namespaces here (checked once)."""
    global _namespaces_work
    if _namespaces_work is None:
        try:
            ok = subprocess.run([*_UNSHARE, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        _namespaces_work = ok
    return _namespaces_work


def _environment(root: str, mark: str) -> dict:
    nowhere = "http://127.0.0.1:9"   # the discard port: proxies that go nowhere, if the network is up
    env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "TMP": root, "TEMP": root,
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "no_proxy": "", "NO_PROXY": "", _MARK_VAR: mark}
    for name in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
        env[name] = env[name.upper()] = nowhere
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep(mark: str) -> int:
    """SIGKILL every process of ours whose environment carries `mark`; returns how many."""
    needle = f"{_MARK_VAR}={mark}".encode()
    killed = 0
    for _ in range(3):   # a process may fork while we look: look again until none is left
        found = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if entry.stat().st_uid != os.getuid() or needle not in (entry / "environ").read_bytes():
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                found += 1
            except (OSError, ValueError):
                continue
        killed += found
        if not found:
            break
    return killed


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run the Python program `source` in the sandbox and classify how it ended.

    passed: ran to the end; failed: an AssertionError (a test failed); timeout: past
    `limits.timeout` wall seconds or its CPU limit; memory: MemoryError (the address-space limit);
    error: anything else (syntax error, exception, refused operation, early exit, crash).
    """
    root = tempfile.mkdtemp(prefix="distillm2-sandbox-")
    try:
        return _run_in(root, source, limits)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_in(root: str, source: str, limits: Limits) -> Outcome:
    Path(root, "program.py").write_text(source, encoding="utf-8")
    nonce, mark = secrets.token_hex(16), secrets.token_hex(8)
    cpu_s = max(1, math.ceil(limits.timeout)) + 1
    prefix = _UNSHARE if limits.isolation == "auto" and namespaces_available() else []
    read_fd, write_fd = os.pipe()
    out_path, err_path = Path(root, "stdout.txt"), Path(root, "stderr.txt")
    cmd = [*prefix, sys.executable, "-I", "-B", _CHILD, root, str(cpu_s), str(limits.memory_mb << 20),
           str(limits.file_mb << 20), str(write_fd), str(int(limits.audit_hook))]
    start = time.monotonic()
    timed_out = False
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=root, env=_environment(root, mark), stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, pass_fds=(write_fd,), start_new_session=True, close_fds=True)
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write((nonce + "\n").encode())
            proc.stdin.close()
        except OSError:   # it died before reading: its exit status says why
            pass
        try:
            proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        seconds = time.monotonic() - start
        _kill_group(proc.pid)   # anything it left in its group
        if not prefix:
            _sweep(mark)
        os.set_blocking(read_fd, False)
        try:
            report = os.read(read_fd, 65536).decode("utf-8", "replace")
        except BlockingIOError:
            report = ""
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return _classify(report, nonce, proc.returncode, timed_out, _tail(err_path), seconds, limits)


def _classify(report: str, nonce: str, returncode: int, timed_out: bool, stderr: str, seconds: float,
              limits: Limits) -> Outcome:
    if timed_out:
        return Outcome("timeout", f"killed after {limits.timeout:g} s", seconds)
    for line in report.splitlines():
        try:
            got = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(got, dict) and got.get("nonce") == nonce and got.get("status") in STATUSES:
            return Outcome(got["status"], str(got.get("detail", "")), seconds)
    # No result from the child: it died, or exited before its tests ended.
    sig = -returncode if returncode < 0 else (returncode - 128 if returncode > 128 else 0)
    if sig == signal.SIGXCPU:
        return Outcome("timeout", "CPU time limit", seconds)
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "bad_alloc" in stderr:
        return Outcome("memory", _last_line(stderr), seconds)
    if sig:   # SIGKILL not sent by us: itself, or the kernel's out-of-memory killer
        return Outcome("error", f"killed by signal {signal.Signals(sig).name}", seconds)
    return Outcome("error", _last_line(stderr) or f"exited with status {returncode} before its tests finished",
                   seconds)


def run_programs(sources: list[str], limits: Limits = Limits(), *, workers: int = 1) -> list[Outcome]:
    """`run_program` over many programs, `workers` at a time (each in its own process and
    directory, so running them side by side is safe; timing-sensitive tests may get slower)."""
    if workers <= 1 or len(sources) <= 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
