"""Mixture-of-experts layers: routing, dropless dispatch, aux loss, HF parity, sharded experts."""
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import models
from distillm2_jax.errors import UserError
from distillm2_jax.hf import from_pretrained, save_pretrained
from distillm2_jax.models import decoder, lora, moe
from distillm2_jax.models.config import ModelConfig, UnsupportedConfigError
from tests.moe_models import build_moe_model, moe_hf_config
from tests.tiny_models import padded_batch, torch_logits

TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny torch matmuls: OpenMP threads only spin on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="qwen3_moe", vocab_size=8, hidden_size=6, intermediate_size=4, num_layers=1,
                num_heads=1, num_kv_heads=1, head_dim=6, rms_norm_eps=1e-6, rope_theta=1e4,
                num_experts=5, experts_per_token=2, moe_intermediate_size=4)
    return ModelConfig(**{**base, **kw})


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------- routing and dispatch

@pytest.mark.parametrize("order,norm", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", False)])
def test_route_matches_numpy(order, norm):
    logits = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    weights, experts = moe.route(_cfg(router_order=order, norm_topk_prob=norm), jnp.asarray(logits))
    top = np.argsort(-logits, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(experts), top)
    if order == "topk_softmax":
        ref = _np_softmax(np.take_along_axis(logits, top, -1))
    else:
        ref = np.take_along_axis(_np_softmax(logits), top, -1)
        if norm:
            ref = ref / ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights), ref, rtol=1e-6)


def _np_expert(cfg, p, e, x):
    """One expert's MLP on one token, in numpy."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    if cfg.expert_activation == "swiglu_clamped":
        gu = x @ p["expert_gate_up"][e] + p["expert_gate_up_bias"][e]
        gate, up = np.minimum(gu[0::2], cfg.swiglu_limit), np.clip(gu[1::2], -cfg.swiglu_limit, cfg.swiglu_limit)
        h = (up + 1) * gate / (1 + np.exp(-cfg.swiglu_alpha * gate))
        return h @ p["expert_down"][e] + p["expert_down_bias"][e]
    h = silu(x @ p["expert_gate"][e]) * (x @ p["expert_up"][e])
    return h @ p["expert_down"][e]


@pytest.mark.parametrize("activation", ["silu", "swiglu_clamped"])
def test_dispatch_matches_a_loop_over_tokens(activation):
    """Uneven groups (4, 0, 1, 5, 0 assignments) and empty experts, against a numpy token loop."""
    gpt = activation == "swiglu_clamped"
    cfg = _cfg(expert_activation=activation, expert_bias=gpt, swiglu_limit=0.8, moe_intermediate_size=3)
    rng = np.random.default_rng(1)
    E, H, N = 5, 6, 5
    specs = {k: v for k, v in decoder._moe_specs(cfg).items() if k.startswith("expert")}
    p = {k: rng.normal(size=shape[1:]).astype(np.float32) for k, (shape, _) in specs.items()}
    x = rng.normal(size=(N, H)).astype(np.float32)
    experts = np.array([[0, 3], [3, 0], [2, 3], [0, 3], [3, 0]], np.int32)
    weights = rng.uniform(size=(N, 2)).astype(np.float32)
    assert np.bincount(experts.ravel(), minlength=E).tolist() == [4, 0, 1, 5, 0]
    got = moe.dispatch(cfg, {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x),
                       jnp.asarray(weights), jnp.asarray(experts))
    ref = np.stack([sum(weights[n, j] * _np_expert(cfg, p, experts[n, j], x[n]) for j in range(2))
                    for n in range(N)])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    if gpt:
        assert np.abs(x @ p["expert_gate_up"][0]).max() > cfg.swiglu_limit, "the clamp is not exercised"


def test_dispatch_has_no_dense_expert_one_hot():
    """No array of the compiled (CPU) MoE MLP is near N*k x E x H (a dense one-hot over experts)."""
    import re

    cfg = _cfg(num_experts=64, experts_per_token=2, hidden_size=32, moe_intermediate_size=16)
    p = {k: jnp.zeros(shape[1:]) for k, (shape, _) in decoder._moe_specs(cfg).items()}
    x = jnp.zeros((128, 32))
    hlo = jax.jit(lambda p, x: moe.moe_mlp(cfg, p, x)[0]).lower(p, x).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"f32\[([0-9,]*)\]", hlo)]
    assert max(sizes) < 128 * 2 * 64 * 32 // 4, max(sizes)


@pytest.mark.parametrize("m,groups", [(72, 8), (5, 5), (1, 4), (300, 3), (64, 128)])
def test_tiled_grouped_matmul_equals_per_row_products(m, groups):
    rng = np.random.default_rng(m)
    sizes = rng.multinomial(m, rng.dirichlet(np.full(groups, 0.5))).astype(np.int32)
    x = rng.normal(size=(m, 6)).astype(np.float32)
    w = rng.normal(size=(groups, 6, 4)).astype(np.float32)
    got = jax.jit(moe.grouped_matmul)(x, w, sizes)
    ref = np.einsum("mk,mkn->mn", x, w[np.repeat(np.arange(groups), sizes)])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- aux loss

def test_aux_loss_equals_transformers_on_the_same_router_logits():
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    rng = np.random.default_rng(2)
    L, B, T, E, k = 3, 2, 5, 8, 3
    logits = rng.normal(size=(L, B * T, E)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ref = load_balancing_loss_func(tuple(torch.tensor(g) for g in logits), E, k, torch.tensor(mask))
    ref_nomask = load_balancing_loss_func(tuple(torch.tensor(g) for g in logits), E, k, None)

    @jax.jit
    def ours(logits, weight):
        stats = jax.vmap(lambda g: moe.router_stats(g, k, weight))(logits)
        return moe.load_balancing_loss(jax.tree.map(lambda a: a.sum(0), stats))

    np.testing.assert_allclose(float(ours(logits, mask.reshape(-1))), float(ref), rtol=1e-5)
    np.testing.assert_allclose(float(ours(logits, np.ones(B * T))), float(ref_nomask), rtol=1e-5)


# ----------------------------------------------------------------------------- HF parity

@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_moe_unnormed", "gpt_oss"])
def moe_dir(request, tmp_path_factory):
    """A tiny HF model per family; gpt-oss: sinks, yarn (factor 4), windows of 4 < T, 3 layers,
    a clamp limit the activations exceed, and expert 5 that no token picks (router bias)."""
    d = tmp_path_factory.mktemp(request.param)
    empty = 5 if request.param == "gpt_oss" else None
    return request.param, d, build_moe_model(request.param, d, initializer_range=0.2, empty_expert=empty)


def test_logits_match_torch_then_export_reloads(moe_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    family, d, torch_model = moe_dir
    model = from_pretrained(d, dtype=jnp.float32)
    assert model.config.num_experts == 8 and model.config.experts_per_token in (2, 3)
    for left in (True, False):
        ids, mask = padded_batch(seed=1, lengths=(12, 7), total=12, left=left)
        ref = torch_logits(torch_model, ids, mask)
        real = mask.astype(bool)
        assert np.abs(ref[real]).std() > 0.5, "logits too small for a meaningful check"
        assert np.abs(np.asarray(model(ids, attention_mask=mask)) - ref)[real].max() <= TOL
    # the routing of this batch is uneven: some experts get several times the tokens of others
    x = jnp.asarray(np.random.default_rng(0).normal(size=(19, 64)), jnp.float32)
    _, experts = moe.route(model.config, moe.router_logits(model.config, jax.tree.map(
        lambda a: a[0], model.params()["layers"]), x))
    counts = np.bincount(np.asarray(experts).ravel(), minlength=8)
    assert counts.max() >= 2 * max(counts.min(), 1)

    out = save_pretrained(model, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    orig = dict(torch_model.state_dict())
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), orig[name].numpy(), err_msg=name)
    ours_again = from_pretrained(out, dtype=jnp.float32)
    assert np.abs(np.asarray(ours_again(ids, attention_mask=mask)) - ref)[real].max() <= TOL


def test_aux_loss_of_the_model_equals_transformers(moe_dir):
    """forward(router_stats=True) pools every layer's real tokens as transformers' aux_loss does
    (forward_pairs' stats are held to forward's in tests/train/test_moe_training.py)."""
    import torch

    family, d, torch_model = moe_dir
    if family != "gpt_oss":
        pytest.skip("one family is enough: gpt-oss's router has a bias, the statistics ignore the top-k weights")
    model = from_pretrained(d, dtype=jnp.float32)
    ids, mask = padded_batch(seed=5, lengths=(12, 6), total=12, left=False)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          output_router_logits=True)
    forward = jax.jit(lambda p, i, m: decoder.forward(p, model.config, i, m, router_stats=True)[2])
    stats = forward(model.params(), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(moe.load_balancing_loss(stats)), float(out.aux_loss), rtol=1e-5)


def test_greedy_generation_with_the_kv_cache_matches_transformers(moe_dir):
    from tests.generation.test_generate import greedy, hf_greedy, random_prompts

    family, d, torch_model = moe_dir
    if family != "qwen3_moe":
        pytest.skip("one family is enough for the sampler")
    model = from_pretrained(d, dtype=jnp.float32)
    prompts = random_prompts(lengths=(11, 7, 3, 9, 14))
    assert [r.tokens for r in greedy(model, prompts, sync_every=5)] == hf_greedy(torch_model, prompts)


# ----------------------------------------------------------------------------- config, LoRA

def test_unsupported_qwen3_moe_layouts_are_one_clear_error():
    with pytest.raises(UnsupportedConfigError, match="mlp_only_layers"):
        models.from_config(moe_hf_config("qwen3_moe", mlp_only_layers=[1]))
    with pytest.raises(UnsupportedConfigError, match="decoder_sparse_step"):
        models.from_config(moe_hf_config("qwen3_moe", decoder_sparse_step=2))


def test_lora_on_experts_is_a_clear_error_and_attention_lora_works():
    model = models.from_config(moe_hf_config("qwen3_moe", num_hidden_layers=1))
    with pytest.raises(UserError, match="LoRA on experts is not supported"):
        lora.add(model.params(), model.config, rank=2, alpha=4, key=jax.random.key(0))
    params = lora.add(model.params(), model.config, rank=2, alpha=4, targets=("q", "v"), key=jax.random.key(0))
    ids = jnp.asarray([[3, 4, 5]])
    base, with_lora = jax.jit(lambda a, b: [decoder.forward(p, model.config, ids)[0] for p in (a, b)])(
        model.params(), params)
    np.testing.assert_allclose(np.asarray(with_lora), np.asarray(base), atol=1e-6)  # B = 0


# ----------------------------------------------------------------------------- sharded experts

_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp, numpy as np
    from distillm2_jax import sharding as shd
    from distillm2_jax.hf import from_pretrained
    from tests.tiny_models import padded_batch
    d = sys.argv[1]
    ids, mask = padded_batch(seed=3, lengths=(12, 5, 9, 12), total=12)
    ref = np.asarray(from_pretrained(d, dtype=jnp.float32)(ids, attention_mask=mask))
    mesh = shd.make_mesh((1, 4, 2))
    model = from_pretrained(d, dtype=jnp.float32, mesh=mesh)
    w = model.layers["expert_down"][...]
    assert w.sharding.spec[1] == "fsdp", w.sharding.spec
    assert w.addressable_shards[0].data.shape[1] == 2, "each fsdp device holds 8 / 4 experts"
    got = np.asarray(model(ids, attention_mask=mask))
    err = float(np.abs(got - ref)[mask.astype(bool)].max())
    assert err <= 1e-5, err
    print("OK", err)
""")


def test_experts_sharded_on_8_devices_give_the_same_logits(moe_dir):
    """8 fake CPU devices: experts split over fsdp (4), expert MLPs over tensor (2)."""
    family, d, _ = moe_dir
    if family != "gpt_oss":
        pytest.skip("one family is enough for the mesh: gpt-oss also shards expert biases")
    if jax.device_count() >= 8:  # the test session already has 8 fake devices: run here
        ns = {}
        code = _SHARDED.replace("d = sys.argv[1]", f"d = {str(d)!r}")
        exec(compile(code, "sharded", "exec"), ns)
        return
    out = subprocess.run([sys.executable, "-c", _SHARDED, str(d)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
