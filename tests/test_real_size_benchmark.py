"""Smoke test of benchmarks/real_size.py at a tiny shape: write, load on the fsdp mesh, one LoRA
DistiLLM-2 step, export, reload. About 36 s on 2 CPU cores (most of it compiling the step): marked slow."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import real_size

TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
        "--vocab", "512"]


@pytest.mark.slow
def test_tiny_real_size_run(tmp_path):
    lines: list[str] = []
    work = tmp_path / "work"
    fig = real_size.main(TINY + ["--out", str(work), "--keep", "--json", str(tmp_path / "fig.json")],
                         log=lambda *a, **k: lines.append(" ".join(map(str, a))))

    # The checkpoint is the requested shape: sharded with an index, tensors in bf16.
    assert fig["layers"] == 2 and fig["hidden"] == 64 and fig["vocab"] == 512
    assert fig["params"] == 512 * 64 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 64 + 2 * 32 + 2 * 64) + 64
    assert (work / "student" / "model.safetensors.index.json").is_file()

    # Load figures are computed; the params are spread over the devices, not copied to each.
    assert fig["load_s"] > 0 and math.isfinite(fig["load_ratio"]) and fig["load_ratio"] > 0
    assert 1.0 <= fig["device_total_ratio"] < 1.2           # tiny norms/biases are replicated
    assert fig["fullest_device_ratio"] < 0.25               # 1/8 of the weights, plus replicas

    # One step ran and moved the adapters.
    assert fig["step_s"] > 0 and math.isfinite(fig["loss"])
    assert fig["lora_b_abs_sum"] > 0

    # The export exists, loads, and its logits are the trained student's.
    export = work / "export"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    assert fig["export_architectures"] == ["Qwen2ForCausalLM"] and fig["export_tokenizer_len"] == 512
    assert fig["logits_max_abs_diff"] <= 1e-3 * max(1.0, fig["logits_max_abs"])

    # The table was printed and the JSON written.
    assert any("load peak RSS increase" in line for line in lines)
    assert json.loads((tmp_path / "fig.json").read_text())["loss"] == fig["loss"]
    assert fig["peak_rss_gib"] > 0


def test_tokenizer_has_exactly_the_model_vocab(tmp_path):
    tok = real_size.build_tokenizer(tmp_path, 300)
    assert len(tok) == 300
    assert tok.convert_tokens_to_ids(list(real_size.SPECIAL_TOKENS)) == [0, 1, 2, 3]
    ids = tok("the quick brown fox")["input_ids"]
    assert tok.decode(ids) == "the quick brown fox"


def test_checkpoint_shapes_match_qwen2_5_1_5b():
    args = real_size.parse_args([])
    cfg = real_size.hf_config(args)
    shapes = {name: shape for name, shape, _ in real_size.hf_tensor_shapes(cfg)}
    assert shapes["model.embed_tokens.weight"] == (151936, 1536)
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (256, 1536)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (1536, 8960)
    assert "lm_head.weight" not in shapes  # tied
    assert sum(math.prod(s) for s in shapes.values()) == 1_543_714_304  # Qwen2.5-1.5B: 1.54B
