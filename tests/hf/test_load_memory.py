"""The loader holds no extra copy of a checkpoint: slices go to their device one at a time and
the safetensors files are mapped only block by block; export restores on an fsdp mesh."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks.real_size import write_checkpoint
from distillm2_jax import sharding as shd
from distillm2_jax.hf import from_pretrained
from distillm2_jax.hf import load as hf_load
from distillm2_jax.hf.names import tensor_maps
from distillm2_jax.train import export as export_lib

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
         "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
         "tie_word_embeddings": True, "use_sliding_window": False, "bos_token_id": 0, "eos_token_id": 0}


def _checkpoint(tmp_path, *, vocab, hidden, layers=2, intermediate=96, heads=4, kv_heads=2, shard_bytes=10**9):
    cfg = dict(QWEN2, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)
    nbytes = write_checkpoint(tmp_path, cfg, seed=0, shard_bytes=shard_bytes)
    return tmp_path, nbytes


def _expected(model_dir, model):
    """Our params built the plain way: every tensor read whole, transposed and stacked."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(model_dir / fname)))
    out = {}
    for tmap in tensor_maps(model.config):
        arrs = [tensors[n].T if tmap.transpose else tensors[n] for n in tmap.hf_names(model.config.num_layers)]
        out[tmap.path[-1]] = np.stack(arrs) if tmap.stacked else arrs[0]
    return out


@pytest.mark.parametrize("mesh_shape", [None, (1, 8, 1), (2, 2, 2)])
def test_blockwise_sharded_load_matches_the_file(tmp_path, monkeypatch, mesh_shape):
    # Several shard files, and read blocks of a few rows: every read is split many times.
    model_dir, _ = _checkpoint(tmp_path, vocab=136, hidden=64, shard_bytes=40_000)
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    monkeypatch.setattr(hf_load, "READ_BLOCK_BYTES", 3 * 4 * 64)  # 3 rows of the hidden-64 tensors
    mesh = None if mesh_shape is None else shd.make_mesh(mesh_shape)
    model = from_pretrained(model_dir, dtype=jnp.float32, mesh=mesh)
    want = _expected(model_dir, model)
    params = model.params()
    flat = {"embed": params["embed"], "final_norm": params["final_norm"], **params["layers"]}
    assert set(flat) == set(want)
    for name, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), want[name].astype(np.float32), err_msg=name)
        if mesh is not None:
            assert value.sharding == shd.named_sharding(
                *reversed(_spec(model, name)), mesh), name


def _spec(model, name):
    from distillm2_jax.models.decoder import param_specs
    specs = param_specs(model.config)
    shape, axes = specs[name] if name in specs else specs["layers"][name]
    return shape, axes


def _read_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def test_sharded_load_peaks_at_about_one_copy_of_the_checkpoint(tmp_path, monkeypatch):
    """8 fake CPU devices (their buffers are host memory): loading a checkpoint dominated by one
    96 MiB tensor raises the peak resident set by about the checkpoint's size. Reading every
    device's slice before placing any (make_array_from_callback) and mapping the whole file for
    the load made it about 1.9x here (the file's pages stayed resident)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS counter (/proc/self/clear_refs)")
    model_dir, nbytes = _checkpoint(tmp_path / "big", vocab=49152, hidden=1024, layers=1, intermediate=64,
                                    heads=8, kv_heads=2)
    assert nbytes > 96 * 2**20
    monkeypatch.setattr(hf_load, "READ_BLOCK_BYTES", 8 * 2**20)  # 4 MiB of bf16 rows mapped at a time
    mesh = shd.make_mesh((1, 8, 1))
    # Warm up on a tiny checkpoint: the first transfers to each device allocate pools that
    # would otherwise count against the measured load.
    warm_dir, _ = _checkpoint(tmp_path / "warm", vocab=136, hidden=64)
    jax.block_until_ready(jax.tree.leaves(from_pretrained(warm_dir, dtype=jnp.bfloat16, mesh=mesh).params()))
    before = _read_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = from_pretrained(model_dir, dtype=jnp.bfloat16, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(model.params()))
    increase = _read_status()["VmHWM"] - before
    assert model.embed[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    # 1x for the device buffers; an eighth of the embedding in flight, a 4 MiB read block,
    # allocator slack. Twice the checkpoint would mean a full extra copy.
    assert increase < 1.5 * nbytes, (increase / nbytes)


def test_export_restores_the_student_on_an_fsdp_mesh(tmp_path, monkeypatch):
    seen = {}

    class Cfg:
        tokenizer_path = None

    monkeypatch.setattr(export_lib.config_lib, "load", lambda path: Cfg())

    def fake_restore(run_dir, *, step=None, mesh=None):
        seen["mesh"] = mesh
        return "student"

    monkeypatch.setattr(export_lib, "restore_student", fake_restore)
    monkeypatch.setattr(export_lib, "save_pretrained", lambda model, out, **kw: (model, out))
    assert export_lib.export_run(tmp_path, tmp_path / "out") == ("student", tmp_path / "out")
    mesh = seen["mesh"]
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}
