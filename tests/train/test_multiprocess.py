"""Two CPU processes joined by jax.distributed (launch/local_cpu.sh) match one process."""
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np

from distillm2_jax import config as config_lib
from distillm2_jax.train.loop import train
from tests.tiny_run import build_tiny_run, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    paths = build_tiny_run(tmp_path / "data", num_prompts=16)
    settings = {"mesh.shape": "[-1,1,1]", "train.epochs": 1, "train.micro_batch": 4}
    single = train(tiny_config(paths, tmp_path / "single", **{**settings, "mesh.shape": "[4,1,1]"}))
    cfg_path = config_lib.dump(tiny_config(paths, tmp_path / "multi", **settings), tmp_path / "multi.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO), DISTILLM2_CPU_DEVICES="2", DISTILLM2_PORT=str(_free_port()),
               LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", str(REPO / "launch" / "local_cpu.sh"), "2", str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("process_*.log")))
    assert proc.returncode == 0, proc.stderr + logs
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    np.testing.assert_allclose([r["loss"] for r in records], [h["loss"] for h in single.history], rtol=2e-5)
    # only process 0 writes: one metrics file, one config, and process 1 printed no summary
    assert "finished" in (tmp_path / "logs" / "process_0.log").read_text()
    assert "finished" not in (tmp_path / "logs" / "process_1.log").read_text()
