"""gpt-oss MXFP4 experts: the FP4 E2M1 / E8M0 decoding, its exactness, and a packed checkpoint."""
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distillm2_jax.errors import CheckpointFormatError
from distillm2_jax.hf import from_pretrained, mxfp4
from tests.moe_models import build_moe_model
from tests.tiny_models import padded_batch, torch_logits


def _e2m1(code: int) -> float:
    """One FP4 E2M1 code from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -mag if sign else mag


def test_dequantize_equals_a_bitwise_decoding_and_is_exact_in_bfloat16():
    """Every byte (two codes) under every scale byte 0..252: the float64 value of the bits."""
    scales = np.arange(253, dtype=np.uint8)
    byte = np.arange(256, dtype=np.uint8)
    blocks = np.broadcast_to(np.resize(byte, (16, 16))[None], (253, 16, 16)).reshape(253, 16, 16)
    got = mxfp4.dequantize(blocks[:, None], np.broadcast_to(scales[:, None], (253, 16))[:, None])
    got = got.reshape(253, 16, 32)
    ref = np.empty((253, 16, 32), np.float64)
    for s in range(253):
        for g in range(16):
            for j in range(16):
                b = int(blocks[s, g, j])
                ref[s, g, 2 * j] = _e2m1(b & 15) * 2.0 ** (s - 127)
                ref[s, g, 2 * j + 1] = _e2m1(b >> 4) * 2.0 ** (s - 127)
    np.testing.assert_array_equal(got.astype(np.float64), ref)
    # MXFP4 -> bfloat16 loses nothing: every value round-trips exactly
    np.testing.assert_array_equal(got.astype(ml_dtypes.bfloat16).astype(np.float64), ref)


def _quantize(w: np.ndarray):
    """Our-layout weights [E, in, out] -> MXFP4 (blocks [E, out, in/32, 16], scales [E, out, in/32])
    and the dequantized weights: per 32 inputs a power-of-two scale, nearest E2M1 code."""
    wt = w.transpose(0, 2, 1)
    E, out, d_in = wt.shape
    groups = wt.reshape(E, out, d_in // 32, 32)
    amax = np.abs(groups).max(-1, keepdims=True)
    exp = np.clip(np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), -127, 127).astype(np.int32)
    q = groups / 2.0 ** exp
    mags = np.abs(mxfp4.E2M1_VALUES[:8])
    code = np.abs(np.abs(q)[..., None] - mags).argmin(-1) + 8 * (q < 0)
    blocks = np.ascontiguousarray((code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8))
    scales = np.ascontiguousarray((exp[..., 0] + 127).astype(np.uint8))  # safetensors writes memory order
    deq = (mxfp4.E2M1_VALUES[code] * 2.0 ** exp).reshape(E, out, d_in).transpose(0, 2, 1)
    return blocks, scales, deq.astype(np.float32)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """A gpt-oss checkpoint whose experts are stored as MXFP4, and the float model it encodes."""
    import torch

    torch.set_num_threads(1)
    src, dst = tmp_path_factory.mktemp("gpt_oss_float"), tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = build_moe_model("gpt_oss", src, initializer_range=0.2)
    tensors = load_file(str(src / "model.safetensors"))
    state = {}
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, deq = _quantize(tensors.pop(name))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            state[name] = torch.tensor(deq)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                      "model.layers.*.mlp.router"]}
    (dst / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        model.load_state_dict(state, strict=False)   # the float model of the dequantized weights
    return dst, model, {k: v.numpy() for k, v in state.items()}


def test_packed_gpt_oss_checkpoint_loads_dequantized(packed_dir, tmp_path):
    from distillm2_jax.hf import save_pretrained

    d, torch_model, deq = packed_dir
    model = from_pretrained(d, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(model.layers["expert_gate_up"][...][1]),
                                  deq["model.layers.1.mlp.experts.gate_up_proj"])
    np.testing.assert_array_equal(np.asarray(model.layers["expert_down"][...][2]),
                                  deq["model.layers.2.mlp.experts.down_proj"])
    # transformers' own MXFP4 conversion of the stored tensors lays them out as ours
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    theirs = convert_moe_packed_tensors(torch.tensor(stored[name + "_blocks"]), torch.tensor(stored[name + "_scales"]),
                                        dtype=torch.float32)
    np.testing.assert_array_equal(np.asarray(model.layers["expert_gate_up"][...][1]), theirs.numpy())
    ids, mask = padded_batch(seed=1, lengths=(12, 7), total=12)
    ref = torch_logits(torch_model, ids, mask)
    assert np.abs(np.asarray(model(ids, attention_mask=mask)) - ref)[mask.astype(bool)].max() <= 1e-4
    # export writes the dequantized weights and a config without the quantization
    out = save_pretrained(model, tmp_path / "export")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(out / "model.safetensors"))


def test_packed_blocks_of_the_wrong_shape_are_one_clear_error(packed_dir, tmp_path):
    d, _, _ = packed_dir
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name][:, :-1]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="MXFP4 tensor 'model.layers.0.mlp.experts.down_proj'"):
        from_pretrained(bad, dtype=jnp.float32)
