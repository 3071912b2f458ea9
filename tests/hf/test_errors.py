"""Bad checkpoints fail with errors that name the tensor and the file."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distillm2_jax.hf import from_pretrained
from distillm2_jax.errors import CheckpointFormatError, UserError
from distillm2_jax.models.config import UnsupportedConfigError
from tests.tiny_models import build_hf_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    build_hf_model("qwen2", d)
    return d


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unknown_architecture(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"config.json: model_type 'gpt2'.*supported: llama"):
        from_pretrained(d)


def test_unsupported_rope_type(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                              "original_max_position_embeddings": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="rope_type 'longrope' is not supported"):
        from_pretrained(d)


def test_missing_tensor(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"'model.layers.1.mlp.up_proj.weight' is missing.*model.safetensors"):
        from_pretrained(d)


def test_unexpected_tensor(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: unexpected tensor 'model.layers.0.mystery.weight'"):
        from_pretrained(d)


def test_wrong_shape(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((31, 64), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointFormatError,
                       match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(31, 64\), expected \(32, 64\)"):
        from_pretrained(d)


def test_corrupt_header(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: cannot read safetensors header"):
        from_pretrained(d)


def test_pickle_checkpoints_are_refused(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointFormatError, match="pickle-based .bin/.pt files are refused"):
        from_pretrained(d)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        from_pretrained(tmp_path / "nope")


def test_missing_shard_file_in_index(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"'model.embed_tokens.weight' is mapped to model-00001-of-00002.safetensors, which does not exist"):
        from_pretrained(d)
