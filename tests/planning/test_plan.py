"""`distillm2 plan`: exact per-device bytes, FLOPs against a hand count, the CLI's output and errors.

The tiny models are config.json files only: plan never reads weights.
"""
import json
from pathlib import Path

import pytest

from distillm2_jax import config as config_lib
from distillm2_jax import planning
from distillm2_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
H, I, L, HEADS, KV, D, V = 256, 768, 2, 4, 2, 64, 256
P, R, G, MICRO, NEW, ROWS = 16, 32, 8, 4, 16, 4


def _model(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False)))
    return str(folder)


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    responses = base / "teacher.jsonl"
    responses.write_text("")
    return [f"model.teacher={_model(base / 'teacher')}", f"model.student={_model(base / 'student')}",
            "model.compute_dtype=float32", "model.student_dtype=float32", "model.teacher_dtype=bfloat16",
            "mesh.shape=[1,2,1]", f"data.max_prompt_length={P}", f"data.max_length={P + R}",
            f"data.teacher_responses={responses}",   # the teacher is not sampled: one sampler to compile
            f"train.global_batch={G}", f"train.micro_batch={MICRO}", "objective.curriculum=false",
            f"generation.batch_size={ROWS}", f"generation.max_new_tokens={NEW}"]


@pytest.fixture(scope="module")
def row(overrides):
    cfg = config_lib.load(ROOT / "configs/default.yaml", overrides)
    (out,) = planning.plan(cfg, devices=2, hardware="h100-80gb")
    return out


def _layer_matmul_params() -> int:
    return L * (H * HEADS * D * 2 + H * KV * D * 2 + 3 * H * I)


def test_bytes_match_a_hand_count(row):
    # fsdp=2 splits every kernel and the embeddings on their hidden axis; norms and biases are replicated.
    kernels = V * H + H * V + _layer_matmul_params()
    small = H + L * 2 * H + L * (HEADS * D + 2 * KV * D)     # final norm, 2 norms/layer, q/k/v biases
    params = (kernels // 2 + small) * 4                        # float32 student
    assert row["params_bytes"] == params == row["trainable_bytes"]
    assert row["teacher_bytes"] == (kernels // 2 + small) * 2  # bfloat16 teacher
    # AdamW: two moments per trainable parameter in its dtype (optax), sharded like the parameter
    # (`train.loop.train_state_shardings`), plus step counters.
    assert 0 <= row["optimizer_bytes"] - 2 * params <= 64
    # KV cache: k and v per layer, [rows, kv heads, prompt + new slots, head_dim], rows over 2 devices.
    assert row["kv_cache_bytes"] == 2 * L * (ROWS // 2) * KV * (P + NEW) * D * 4
    assert row["total_bytes"] >= row["params_bytes"] + row["optimizer_bytes"] + row["teacher_bytes"]


def test_flops_match_6n_plus_attention(row):
    n = _layer_matmul_params()
    layer_tokens = G * (P + 2 * R)              # a pair's prompt runs once, then its two responses
    head_positions = G * 2 * (R + 1)            # the loss reads the last prompt state and the responses
    attention = L * G * 4 * HEADS * D * (P * P + 2 * R * (P + R))   # forward q.k and p.v (one block each)
    student = 6 * (n * layer_tokens + H * V * head_positions) + 3 * attention
    teacher = 2 * (n * layer_tokens + H * V * head_positions) + attention
    expected = student + teacher
    assert row["flops_per_step"] == pytest.approx(expected, rel=0.10)
    assert row["flops_per_step"] > 2 * row["flops_per_step_xla_once"]   # loops counted by their trip counts
    assert row["step_time_s"] > 0 and row["step_bound"] in ("compute", "memory")
    (gen,) = row["generation"]
    assert gen["model"] == "student" and gen["flops_per_token"] > 2 * (n + H * V)


def test_cli_table_json_and_suggestion(overrides, capsys):
    assert main(["plan", str(ROOT / "configs/default.yaml"), *overrides, "--devices", "2",
                 "--hardware", "h100-80gb,tpu-v5e"]) == 0
    out = capsys.readouterr().out
    assert "per device" in out and "h100-80gb" in out and "tpu-v5e" in out and "fits in 80 GiB" in out

    assert main(["plan", str(ROOT / "configs/default.yaml"), *overrides, "--devices", "2", "--json",
                 "--hbm-gib", "0.001", "--peak-tflops", "100", "--bandwidth-tbs", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    for key in ("params_bytes", "optimizer_bytes", "teacher_bytes", "temp_bytes", "kv_cache_bytes",
                "total_bytes", "flops_per_step", "fits"):
        assert key in row
    assert row["hardware"] == "custom" and row["fits"] is False and row["suggestions"]


def test_cli_bad_override_is_one_line(overrides, capsys):
    assert main(["plan", str(ROOT / "configs/default.yaml"), *overrides, "train.not_a_key=3",
                 "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distillm2 plan: error:") and "not_a_key" in err and "\n" not in err
    assert main(["plan", str(ROOT / "configs/default.yaml"), *overrides, "--devices", "2",
                 "--hardware", "h200"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_presets_have_the_public_figures():
    assert planning.PRESETS["h100-80gb"] == planning.Hardware("h100-80gb", 80.0, 989.0, 3.35)
    assert planning.PRESETS["tpu-v5e"].hbm_gib == 16.0 and planning.PRESETS["tpu-v4"].peak_tflops == 275.0
