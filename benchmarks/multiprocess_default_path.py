"""Algorithm 1's default path (prompts only: teacher generation, student regeneration every
epoch, the curriculum from epoch 2) on 1 process x 4 CPU devices against 2 processes x 2 CPU
devices through launch/local_cpu.sh, side by side: wall seconds of each and whether the
generated data files are byte-identical. Tiny models of the tests; CPU only.

With --kill I (0 or 1): instead, start 2 training processes, SIGKILL process I after 6 steps and
print how long the survivor took to exit, its exit status and its last line (heartbeat timeout
--timeout seconds).

    python benchmarks/multiprocess_default_path.py [--prompts 64] [--epochs 2] [--out /tmp/mp_bench]
    python benchmarks/multiprocess_default_path.py --kill 1 [--timeout 10]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distillm2_jax import config as config_lib  # noqa: E402
from tests.tiny_run import build_tiny_run, tiny_config  # noqa: E402

FILES = ("teacher.jsonl", "student_epoch1.jsonl", "student_epoch2.jsonl", "pairs_epoch1.jsonl", "pairs_epoch2.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/mp_bench")
    ap.add_argument("--kill", type=int, choices=(0, 1), help="measure a dead peer instead")
    ap.add_argument("--timeout", type=int, default=10, help="distributed.heartbeat_timeout_s for --kill")
    args = ap.parse_args(argv)
    out = Path(args.out)
    paths = build_tiny_run(out / "data", num_prompts=args.prompts)
    if args.kill is not None:
        return kill(out, paths, args.kill, args.timeout)
    settings = {"data.pairs": "null", "generation.regenerate_student": "true", "train.epochs": args.epochs,
                "train.micro_batch": 4}
    cfgs = {name: config_lib.dump(tiny_config(paths, out / name, **{**settings, "mesh.shape": shape}),
                                  out / f"{name}.yaml")
            for name, shape in (("one", "[4,1,1]"), ("two", "[-1,1,1]"))}
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distillm2_jax.cli", "train", str(cfgs["one"])], env=env, check=True,
                   capture_output=True)
    one = time.perf_counter() - t
    env = dict(os.environ, PYTHONPATH=str(REPO), LOG_DIR=str(out / "logs"))
    t = time.perf_counter()
    subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "--python", sys.executable, "2", str(cfgs["two"])],
                   env=env, check=True)
    two = time.perf_counter() - t
    names = [n for n in FILES if (out / "one" / "data" / n).exists()]
    same = all((out / "one/data" / n).read_bytes() == (out / "two/data" / n).read_bytes() for n in names)
    print(f"1 process x 4 devices: {one:.1f} s; 2 processes x 2 devices: {two:.1f} s (ratio {two / one:.2f}); "
          f"{len(names)} data files identical: {same}")
    return 0


def kill(out: Path, paths: dict, victim: int, timeout_s: int) -> int:
    cfg = config_lib.dump(tiny_config(paths, out / "kill", **{
        "mesh.shape": "[-1,1,1]", "train.epochs": 50, "train.micro_batch": 4,
        "distributed.heartbeat_timeout_s": timeout_s}), out / "kill.yaml")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="", DISTILLM2_CPU_DEVICES="2",
                   DISTILLM2_COORDINATOR=f"127.0.0.1:{port}", DISTILLM2_NUM_PROCESSES="2", DISTILLM2_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "distillm2_jax.cli", "train", str(cfg)], env=env,
                                      stdout=open(out / f"kill_process_{i}.log", "w"), stderr=subprocess.STDOUT))
    metrics = out / "kill" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
        if any(p.poll() is not None for p in procs):
            sys.exit(f"a process ended before the kill; see {out}/kill_process_*.log")
        time.sleep(0.05)
    procs[victim].send_signal(signal.SIGKILL)
    t = time.perf_counter()
    status = procs[1 - victim].wait(timeout=600)
    waited = time.perf_counter() - t
    last = [ln for ln in (out / f"kill_process_{1 - victim}.log").read_text().splitlines()
            if ln.startswith(("error:", "F")) and not ln.startswith("F ")]
    print(f"process {victim} killed: process {1 - victim} exited with status {status} after {waited:.1f} s "
          f"(heartbeat timeout {timeout_s} s); {last[0][:200] if last else '(no error line)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
