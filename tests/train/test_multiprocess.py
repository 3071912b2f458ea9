"""Two CPU processes joined by jax.distributed (launch/local_cpu.sh) match one process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from distillm2_jax import api, config as config_lib
from distillm2_jax.train.loop import train
from tests.tiny_run import build_tiny_run, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    """Pre-paired data, no regeneration (the default path below covers this one's ground in CI)."""
    paths = build_tiny_run(tmp_path / "data", num_prompts=16)
    settings = {"mesh.shape": "[-1,1,1]", "train.epochs": 1, "train.micro_batch": 4}
    single = train(tiny_config(paths, tmp_path / "single", **{**settings, "mesh.shape": "[4,1,1]"}))
    cfg_path = config_lib.dump(tiny_config(paths, tmp_path / "multi", **settings), tmp_path / "multi.yaml")
    proc, logs = _launch(tmp_path, "multi", 2, cfg_path)
    assert proc.returncode == 0, proc.stderr + logs
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in records], [h["loss"] for h in single.history], rtol=2e-5)


def _launch(tmp_path, name: str, n: int, *args: str, timeout: int = 600, **env_extra):
    """Run `launch/local_cpu.sh --python THIS n ARGS` without the venv activated (its logs: logs_NAME)."""
    logs = tmp_path / f"logs_{name}"
    env = dict(os.environ, PYTHONPATH=str(REPO), DISTILLM2_CPU_DEVICES="2", DISTILLM2_PORT=str(_free_port()),
               LOG_DIR=str(logs), **env_extra)
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "--python", sys.executable, str(n),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("process_*.log")))
    return proc, text


def test_default_algorithm1_path_on_two_processes_matches_one(tmp_path):
    """Prompts only: teacher generation, student regeneration every epoch, the curriculum from
    epoch 2, checkpoints; the same pairs files and (within float32) the same final student."""
    paths = build_tiny_run(tmp_path / "data", num_prompts=16)
    settings = {"data.pairs": "null", "generation.regenerate_student": "true", "train.epochs": 2,
                "train.micro_batch": 4, "mesh.shape": "[-1,1,1]"}
    single_cfg = tiny_config(paths, tmp_path / "single", **{**settings, "mesh.shape": "[4,1,1]"})
    assert single_cfg.objective.curriculum and single_cfg.objective.name == "distillm2"
    single = train(single_cfg)
    cfg_path = config_lib.dump(tiny_config(paths, tmp_path / "multi", **settings), tmp_path / "multi.yaml")
    proc, logs = _launch(tmp_path, "multi", 2, cfg_path)
    assert proc.returncode == 0, proc.stderr + logs
    for name in ("teacher.jsonl", "student_epoch1.jsonl", "student_epoch2.jsonl",
                 "pairs_epoch1.jsonl", "pairs_epoch2.jsonl"):
        assert (tmp_path / "multi" / "data" / name).read_bytes() == (tmp_path / "single" / "data" / name).read_bytes(), name
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [h["step"] for h in single.history]
    np.testing.assert_allclose([r["ref_gap"] for r in records], [h["ref_gap"] for h in single.history], rtol=1e-5)
    assert records[-1]["ref_gap"] != 0.0       # the curriculum ran in epoch 2
    a, b = api.restore_student(tmp_path / "single"), api.restore_student(tmp_path / "multi")
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # only process 0 writes: one metrics file, one config, and process 1 printed no summary
    assert "finished" in (tmp_path / "logs_multi" / "process_0.log").read_text()
    assert "finished" not in (tmp_path / "logs_multi" / "process_1.log").read_text()


def test_generate_command_on_two_processes_matches_one(tmp_path):
    """`distillm2 generate` on 2 processes x 2 devices writes the file 1 process x 4 devices writes."""
    from distillm2_jax import cli

    paths = build_tiny_run(tmp_path / "data", num_prompts=12)
    args = ["--model", str(paths["teacher"]), "--prompts", str(paths["prompts"]), "--max-new-tokens", "8",
            "--batch-size", "8", "--dtype", "float32", "--no-progress"]
    assert cli.main(["generate", *args, "--out", str(tmp_path / "one.jsonl"), "--mesh", "4,1,1"]) == 0
    proc, logs = _launch(tmp_path, "gen", 2, "generate", *args, "--out", str(tmp_path / "two.jsonl"))
    assert proc.returncode == 0, proc.stderr + logs
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert "distillm2 generate: wrote 12 of 12 rows" in (tmp_path / "logs_gen" / "process_0.log").read_text()


def _start(tmp_path, cfg_paths: list[Path], port: int, name: str) -> list[subprocess.Popen]:
    """The processes launch/local_cpu.sh would start (process i trains cfg_paths[i]), as handles
    (to kill one of them); their output goes to NAME_process_I.log."""
    procs = []
    for i, cfg_path in enumerate(cfg_paths):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="", DISTILLM2_CPU_DEVICES="2",
                   DISTILLM2_COORDINATOR=f"127.0.0.1:{port}", DISTILLM2_NUM_PROCESSES=str(len(cfg_paths)),
                   DISTILLM2_PROCESS_ID=str(i))
        log = open(tmp_path / f"{name}_process_{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "distillm2_jax.cli", "train", str(cfg_path)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_a_dead_process_stops_the_survivor_and_the_rerun_resumes(tmp_path):
    """SIGKILL process 1 mid-training: process 0 exits non-zero within the heartbeat timeout,
    naming the lost process; rerunning the same command ends with an uninterrupted run's student."""
    timeout_s = 5
    paths = build_tiny_run(tmp_path / "data", num_prompts=64)
    settings = {"mesh.shape": "[-1,1,1]", "train.epochs": 3, "train.micro_batch": 4,
                "distributed.heartbeat_timeout_s": timeout_s}
    reference = train(tiny_config(paths, tmp_path / "reference", **{**settings, "mesh.shape": "[4,1,1]"}))
    cfg_path = config_lib.dump(tiny_config(paths, tmp_path / "run", **settings), tmp_path / "run.yaml")
    procs = _start(tmp_path, [cfg_path] * 2, _free_port(), "first")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    logs = lambda name: "\n".join((tmp_path / f"{name}_process_{i}.log").read_text()[-3000:] for i in (0, 1))  # noqa: E731
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert procs[0].poll() is None and procs[1].poll() is None and time.monotonic() < deadline, logs("first")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc = procs[0].wait(timeout=120)
    waited = time.monotonic() - killed
    log = (tmp_path / "first_process_0.log").read_text()
    assert rc == 1 and waited < timeout_s + 30, (rc, waited, log[-2000:])
    assert "error: process 1 of 2 sent no heartbeat for" in log and "Rerun the same command" in log, log[-2000:]
    assert "Traceback" not in log and "Check failure" not in log, log[-2000:]
    steps_before = len(metrics.read_text().splitlines())
    assert steps_before < reference.steps
    procs = _start(tmp_path, [cfg_path] * 2, _free_port(), "rerun")
    assert [p.wait(timeout=600) for p in procs] == [0, 0], logs("rerun")
    assert "resumed from" in (tmp_path / "rerun_process_0.log").read_text()
    a, b = api.restore_student(tmp_path / "reference"), api.restore_student(tmp_path / "run")
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_an_error_on_one_process_stops_the_others_at_once(tmp_path):
    """Process 1 cannot load its student (a host-local problem): it stops with its error, and
    process 0 exits too, naming process 1 and the error, instead of waiting in a collective."""
    paths = build_tiny_run(tmp_path / "data", num_prompts=16)
    settings = {"mesh.shape": "[-1,1,1]", "train.micro_batch": 4, "distributed.heartbeat_timeout_s": 60}
    good = config_lib.dump(tiny_config(paths, tmp_path / "run", **settings), tmp_path / "good.yaml")
    broken = tmp_path / "broken_student"      # exists (the config check passes), cannot be loaded
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nowhere"}')
    bad = config_lib.dump(tiny_config(paths, tmp_path / "run", **{**settings, "model.student": broken}),
                          tmp_path / "bad.yaml")
    procs = _start(tmp_path, [good, bad], _free_port(), "error")
    t0 = time.monotonic()
    codes = [p.wait(timeout=300) for p in procs]
    out0, out1 = ((tmp_path / f"error_process_{i}.log").read_text() for i in (0, 1))
    assert codes == [1, 2], (codes, out0[-2000:], out1[-2000:])
    assert "broken_student" in out1, out1[-2000:]
    assert "process 1 of 2 stopped with an error" in out0, out0[-2000:]
    assert "broken_student" in out0 and "Traceback" not in out0, out0[-2000:]
    assert time.monotonic() - t0 < 60          # well before the 60 s heartbeat timeout would have said so
