"""Logits of every family equal Hugging Face's PyTorch model, before and after export."""
import numpy as np
import jax.numpy as jnp
import pytest

from distillm2_jax import sharding as shd
from distillm2_jax.hf import from_pretrained, save_pretrained
from tests.tiny_models import FAMILIES, build_hf_model, padded_batch, torch_logits

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = build_hf_model(request.param, d, initializer_range=0.2)
    return request.param, d, torch_model


def _max_err(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_import_matches_torch(family_dir, left):
    family, d, torch_model = family_dir
    model = from_pretrained(d, dtype=jnp.float32)
    ids, mask = padded_batch(seed=1, left=left)
    ref = torch_logits(torch_model, ids, mask)
    assert np.abs(ref[mask.astype(bool)]).std() > 0.5, "logits too small for a meaningful check"
    assert _max_err(model(ids, attention_mask=mask), ref, mask) <= TOL


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_long_rows_in_causal_query_blocks_match_torch(family_dir, left):
    """T = 200 runs the training attention in 3 causal query blocks (windows, soft-caps, padding)."""
    from distillm2_jax.models import attention

    family, d, torch_model = family_dir
    assert len(attention.causal_query_blocks(200)) == 3
    model = from_pretrained(d, dtype=jnp.float32)
    ids, mask = padded_batch(seed=4, lengths=(190, 131), total=200, left=left)
    ref = torch_logits(torch_model, ids, mask)
    assert _max_err(model(ids, attention_mask=mask), ref, mask) <= TOL


def test_export_reloads_in_transformers(family_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    family, d, torch_model = family_dir
    model = from_pretrained(d, dtype=jnp.float32)
    out = save_pretrained(model, tmp_path / "export")
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, mask = padded_batch(seed=2)
    ref = torch_logits(reloaded, ids, mask)
    assert _max_err(model(ids, attention_mask=mask), ref, mask) <= TOL
    # and the exported weights are exactly the imported ones
    orig = dict(torch_model.state_dict())
    for name, tensor in reloaded.state_dict().items():
        if name in orig:
            np.testing.assert_array_equal(tensor.numpy(), orig[name].numpy(), err_msg=name)


def test_import_on_2x4_mesh_matches(family_dir):
    family, d, torch_model = family_dir
    mesh = shd.make_mesh((1, 2, 4))
    model = from_pretrained(d, dtype=jnp.float32, mesh=mesh)
    q = model.layers["q"][...]
    assert q.sharding.spec == shd.logical_to_spec(("layers", "embed", "heads"), q.shape, mesh)
    assert q.addressable_shards[0].data.size == q.size // 8, "q kernel should be split over 8 devices"
    ids, mask = padded_batch(seed=3)
    ref = torch_logits(torch_model, ids, mask)
    assert _max_err(model(ids, attention_mask=mask), ref, mask) <= TOL
