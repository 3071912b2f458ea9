"""Metrics JSONL/TensorBoard writer, reader, FLOPs/MFU arithmetic and the plot command."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax.cli import main
from distillm2_jax.errors import UserError
from distillm2_jax.models import ModelConfig
from distillm2_jax.train import metrics as M

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, rope_theta=1e4,
                layer_windows=(0, 0))
    return ModelConfig(**{**base, **kw})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_values_and_flush(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(1, {"loss": jnp.float32(0.5), "skl": np.float64(0.25), "tokens": np.int32(7),
                       "nan": float("nan"), "inf": jnp.array([jnp.inf]), "ninf": -math.inf, "mfu": None,
                       "bf16": jnp.asarray(1.5, jnp.bfloat16), "ok": jnp.asarray(True), "note": "x",
                       "step": 99})
        # flushed line by line: readable before close
        (first,) = lines(tmp_path / "metrics.jsonl")
        assert first["step"] == 1 and first["loss"] == 0.5 and first["skl"] == 0.25
        assert first["tokens"] == 7 and isinstance(first["tokens"], int)
        assert (first["nan"], first["inf"], first["ninf"], first["mfu"]) == ("nan", "inf", "-inf", None)
        assert first["bf16"] == 1.5 and first["ok"] is True and first["note"] == "x"
        assert isinstance(first["time"], float)
        with pytest.raises(TypeError, match="'vec'"):
            writer.log(2, {"vec": np.ones(3)})
        writer.log(2, {"loss": 0.4})
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]
    rec = M.read_metrics(tmp_path)
    assert math.isnan(rec[0]["nan"]) and rec[0]["inf"] == math.inf and rec[0]["ninf"] == -math.inf


def test_disabled_writer_writes_nothing(tmp_path):
    with M.MetricsWriter(tmp_path / "r", enabled=False) as writer:
        writer.log(1, {"loss": 1.0})
    assert not (tmp_path / "r").exists()
    assert M.MetricsWriter(tmp_path / "p", tensorboard=False).enabled  # process 0 by default


def test_tensorboard_events_read_back(tmp_path):
    with M.MetricsWriter(tmp_path) as writer:
        for step in (10, 20):
            writer.log(step, {"loss": 1.0 / step, "lr": 1e-4, "note": "skipped", "mfu": None,
                              "grad_norm": float("nan")})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars = M.read_tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [10, 20]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [0.1, 0.05], rtol=1e-6)
    assert "note" not in scalars and "mfu" not in scalars and math.isnan(scalars["grad_norm"][0][1])
    with M.MetricsWriter(tmp_path) as writer:  # resumed: a new event file that purges steps >= 15
        writer.log(15, {"loss": 0.07})
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert (15, pytest.approx(0.07)) in M.read_tensorboard_scalars(tmp_path / "tensorboard")["loss"]


def test_resume_drops_partial_line_and_reader_keeps_latest(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    with M.MetricsWriter(tmp_path, tensorboard=False) as writer:  # resumed from a step-2 checkpoint
        writer.log(3, {"loss": 1.5})
        writer.log(3, {"eval_loss": 1.7})
        writer.log(4, {"loss": 1.2})
    records = M.read_metrics(path)
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records] == [
        (1, 3, None), (2, 2, None), (3, 1.5, 1.7), (4, 1.2, None)]


@pytest.mark.parametrize("text, message", [
    ('{"step": 1, "loss": 1}\n{"step": 2, "loss": \n', ":2: not valid JSON"),
    ('{"step": 1}\n\n[1, 2]\n', ":3: expected a JSON object"),
    ('{"loss": 1}\n', ":1: 'step' is missing or not an integer"),
    ('{"step": "3"}\n', ":1: 'step' is missing"),
])
def test_malformed_lines_name_the_line(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        M.read_metrics(path)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value)


def test_flops_by_hand():
    cfg = tiny_cfg()
    # per layer: q,o 4*4 each, k,v 4*2 each = 48; mlp 3*4*8 = 96; 2 layers; head 4*10
    assert M.matmul_params(cfg) == 2 * (48 + 96) + 40 == 328
    assert M.attention_flops_per_token(cfg, 8) == 4 * 2 * 2 * (8 + 8) == 256
    assert M.flops_per_token(cfg, 8) == 6 * 328 + 3 * 256 == 2736
    assert M.flops_per_token(cfg, 8, trainable=False) == 2 * 328 + 256
    assert M.lora_params(cfg, 1, ["q"]) == 2 * (4 + 4)
    assert M.flops_per_token(cfg, 8, lora_rank=1, lora_targets=["q"]) == 4 * 328 + 3 * 256 + 6 * 16
    # a sliding window of 4 caps the attended span of its layer
    assert M.attention_flops_per_token(tiny_cfg(layer_windows=(4, 0)), 8) == 4 * 2 * 2 * (4 + 8)
    # tied head: the embedding matrix counts once, as the head
    tied = tiny_cfg(tie_word_embeddings=True)
    assert M.matmul_params(tied) == 328
    # consistent with ModelConfig.num_params (minus the embedding gather and the norms)
    assert M.matmul_params(cfg) == cfg.num_params() - 10 * 4 - 2 * 2 * 4 - 4


def test_mfu_and_peaks():
    assert M.mfu(1000.0, 2736.0, 5_472_000.0) == pytest.approx(0.5)
    # 8 H100s, 7B-ish model: 6 * 7e9 FLOPs/token at 20k tokens/s
    assert M.mfu(20_000, 6 * 7e9, 8 * 989.4e12) == pytest.approx(20_000 * 42e9 / 7915.2e12)
    assert M.mfu(1000.0, 1.0, None) is None and M.mfu(1.0, 1.0, 0.0) is None
    kinds = {"NVIDIA H100 80GB HBM3": 989.4e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989.4e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
             "TPU v5p": 459e12, "TPU v6 lite": 918e12, "cpu": None, "Tesla T4": None}
    for kind, peak in kinds.items():
        assert M.peak_flops_per_device(kind) == peak, kind
    assert M.peak_flops() is None  # CPU devices in tests

    class Dev:
        device_kind = "TPU v4"

    assert M.peak_flops([Dev(), Dev()]) == 2 * 275e12


def test_plot_command_writes_a_png(tmp_path, capsys):
    with M.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.log(step, {"loss": 1 / step, "skl": 0.5 / step, "srkl": 0.2, "alpha_mean": 0.05,
                              "alpha_min": 0.01, "alpha_max": 0.1, "beta": 0.5, "lr": 1e-5 * step,
                              "grad_norm": float("nan") if step == 3 else 1.0, "tokens_per_s": 100.0,
                              "mfu": None, "epoch": 1})
    assert main(["plot", str(tmp_path)]) == 0
    png = (tmp_path / "metrics.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert "metrics.png" in capsys.readouterr().out
    from distillm2_jax.commands.plot import choose_panels

    panels = dict(choose_panels(M.read_metrics(tmp_path)))
    assert panels["alpha"] == ("alpha_mean", "alpha_min", "alpha_max") and "mfu" not in panels
    assert "epoch" not in panels
    out = tmp_path / "sub" / "x.png"
    assert main(["plot", str(tmp_path / "metrics.jsonl"), "--out", str(out), "--keys", "loss+skl,alpha"]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distillm2 plot: error:") and "metrics.jsonl: no such file" in err and "\n" not in err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n')
    assert main(["plot", str(tmp_path), "--keys", "loss,bogus"]) == 2
    assert "no numeric metric 'bogus' (available: loss)" in capsys.readouterr().err
