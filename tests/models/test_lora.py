"""LoRA leaves: no-op at init, merge equals the adapted forward, export, masks, dropout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distillm2_jax import models
from distillm2_jax import sharding as shd
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.hf.save import save_pretrained
from distillm2_jax.models import decoder, lora
from tests.tiny_models import hf_config, padded_batch

RANK, ALPHA = 4, 8.0


@functools.partial(jax.jit, static_argnums=1)
def logits(params, cfg, ids, mask):
    hidden, _ = decoder.forward(params, cfg, ids, mask)
    return decoder.logits_from_hidden(params, cfg, hidden)


@pytest.fixture(scope="module")
def model():
    return models.from_config(hf_config("llama", initializer_range=0.2), seed=0)


@pytest.fixture(scope="module")
def zero_b(model):
    """LoRA on every target, freshly added (B = 0)."""
    return lora.add(model.params(), model.config, rank=RANK, alpha=ALPHA, key=jax.random.key(1))


@pytest.fixture(scope="module")
def adapted(zero_b):
    """The same adapters with random (non-zero) B."""
    rng = np.random.default_rng(2)
    layers = {k: (jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype) if k.endswith("_lora_b") else v)
              for k, v in zero_b["layers"].items()}
    return {**zero_b, "layers": layers}


def test_shapes_specs_and_init(model, zero_b):
    cfg = model.config
    layers = zero_b["layers"]
    L, H, I, D = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    assert layers["q_lora_a"].shape == (L, H, RANK) and layers["q_lora_b"].shape == (L, RANK, cfg.num_heads * D)
    assert layers["k_lora_b"].shape == (L, RANK, cfg.num_kv_heads * D)
    assert layers["o_lora_a"].shape == (L, cfg.num_heads * D, RANK) and layers["o_lora_b"].shape == (L, RANK, H)
    assert layers["down_lora_a"].shape == (L, I, RANK) and layers["down_lora_b"].shape == (L, RANK, H)
    np.testing.assert_array_equal(layers["q_lora_scale"], np.full(L, ALPHA / RANK))
    assert not np.any(np.asarray(layers["q_lora_b"]))
    a = np.asarray(layers["down_lora_a"])
    assert np.abs(a).max() <= 1 / np.sqrt(I) and np.abs(a).max() > 0.5 / np.sqrt(I)  # PEFT bound
    assert not np.array_equal(layers["gate_lora_a"], layers["up_lora_a"])  # one key per target
    specs = lora.param_specs(cfg, RANK)
    assert specs["q_lora_a"] == ((L, H, RANK), ("layers", "embed", "lora_rank"))
    assert specs["q_lora_b"] == ((L, RANK, cfg.num_heads * D), ("layers", "lora_rank", "heads"))
    assert specs["k_lora_b"][1] == ("layers", "lora_rank", "kv_heads")
    assert specs["o_lora_a"][1] == ("layers", "heads", "lora_rank")
    assert specs["gate_lora_b"][1] == ("layers", "lora_rank", "mlp")
    assert specs["down_lora_a"][1] == ("layers", "mlp", "lora_rank")
    assert specs["down_lora_scale"] == ((L,), ("layers",))
    assert {k: v.shape for k, v in layers.items() if "_lora_" in k} == {k: s for k, (s, _) in specs.items()}
    assert set(lora.param_specs(cfg, RANK, ["q"])) == {"q_lora_a", "q_lora_b", "q_lora_scale"}
    with pytest.raises(ValueError, match="qkv"):
        lora.param_specs(cfg, RANK, ["qkv"])
    with pytest.raises(ValueError, match="already hold LoRA"):
        lora.add(zero_b, cfg, rank=RANK, alpha=ALPHA, key=jax.random.key(0))


def test_add_some_targets_on_a_mesh(model):
    mesh = shd.make_mesh((1, 2, 4))
    params = lora.add(model.params(), model.config, rank=RANK, alpha=ALPHA, targets=("q", "down"),
                      key=jax.random.key(0), mesh=mesh)
    assert sorted(k for k in params["layers"] if "_lora_" in k) == [
        "down_lora_a", "down_lora_b", "down_lora_scale", "q_lora_a", "q_lora_b", "q_lora_scale"]
    a, b = params["layers"]["q_lora_a"], params["layers"]["q_lora_b"]
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_zero_b_leaves_the_model_unchanged(model, zero_b):
    cfg, base = model.config, model.params()
    ids, mask = padded_batch(seed=1)
    ref = logits(base, cfg, ids, mask)
    # identical math; XLA may fuse the zero branch differently: 1e-6 of the logits' scale
    np.testing.assert_allclose(logits(zero_b, cfg, ids, mask), ref, atol=1e-6 * float(np.abs(ref).max()), rtol=0)


def test_merge_equals_the_adapted_forward(model, adapted):
    cfg, base = model.config, model.params()
    ids, mask = padded_batch(seed=2)
    got = np.asarray(logits(adapted, cfg, ids, mask))
    merged = lora.merge(adapted)
    assert set(merged["layers"]) == set(base["layers"])
    assert np.abs(got - np.asarray(logits(base, cfg, ids, mask))).max() > 1e-2  # adapters matter
    np.testing.assert_allclose(got, logits(merged, cfg, ids, mask), atol=1e-5, rtol=1e-5)
    # bfloat16 base weights stay bfloat16
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 3 and x.shape[-1] != RANK else x, adapted)
    assert lora.merge(bf16)["layers"]["q"].dtype == jnp.bfloat16


def test_merged_params_export_and_reload(model, adapted, tmp_path):
    cfg = model.config
    merged = lora.merge(adapted)
    out = save_pretrained(models.Decoder(cfg, merged, hf_config=model.hf_config), tmp_path / "m")
    reloaded = from_pretrained(out)
    assert reloaded.config == cfg
    ids, mask = padded_batch(seed=3)
    np.testing.assert_allclose(logits(reloaded.params(), cfg, ids, mask), logits(adapted, cfg, ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_split_combine(adapted):
    trainable, frozen = lora.split(adapted)
    assert set(trainable) == {"layers"}
    assert set(trainable["layers"]) == {f"{t}_lora_{s}" for t in lora.LORA_TARGETS for s in "ab"}
    assert "q_lora_scale" in frozen["layers"] and "embed" in frozen and "q_lora_a" not in frozen["layers"]
    again = lora.combine(trainable, frozen)
    assert jax.tree.structure(again) == jax.tree.structure(adapted)


def test_optimizer_state_for_the_adapters_only(zero_b):
    """The trainer's form: the optimizer sees the split's trainable part, so a step cannot touch
    the base weights and keeps no state for them."""
    params = zero_b
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), params)  # every leaf has a gradient
    trainable, frozen = lora.split(params)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(trainable)
    assert len(jax.tree.leaves(state)) == 1 + 2 * len(jax.tree.leaves(trainable))
    g_trainable = lora.split(grads)[0]
    assert jax.tree.structure(g_trainable) == jax.tree.structure(trainable)
    updates, _ = jax.jit(tx.update)(g_trainable, state, trainable)
    new = lora.combine(optax.apply_updates(trainable, updates), frozen)
    for name, value in new["layers"].items():
        changed = not np.array_equal(value, params["layers"][name])
        assert changed == lora.is_lora_leaf(name), name
    assert np.array_equal(new["embed"], params["embed"])


def test_with_dropout_entries_and_effect(model, zero_b, adapted):
    cfg = model.config
    assert lora.with_dropout(adapted, jax.random.key(0), 0.0) is adapted
    assert lora.with_dropout(model.params(), jax.random.key(0), 0.1) is not None  # no LoRA: unchanged
    step = lora.with_dropout(adapted, jax.random.key(3), 0.5)
    keys, rates = step["layers"]["lora_dropout_key"], step["layers"]["lora_dropout_rate"]
    assert keys.shape == (cfg.num_layers,) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    assert rates.shape == (cfg.num_layers,) and rates.dtype == jnp.float32
    raw_key = lora.with_dropout(adapted, jax.random.PRNGKey(3), 0.5)["layers"]["lora_dropout_key"]
    assert raw_key.shape == (cfg.num_layers,)
    with pytest.raises(ValueError, match="dropout rate"):
        lora.with_dropout(adapted, jax.random.key(0), 1.0)
    assert "lora_dropout_key" not in lora.merge(step)["layers"]
    assert "lora_dropout_rate" not in lora.split(step)[0]["layers"]
    ids, mask = padded_batch(seed=5)
    ref = np.asarray(logits(adapted, cfg, ids, mask))
    a = np.asarray(logits(step, cfg, ids, mask))
    b = np.asarray(logits(lora.with_dropout(adapted, jax.random.key(4), 0.5), cfg, ids, mask))
    assert np.abs(a - ref).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    # dropout acts on the LoRA branch only: with B = 0 the output is the base model's
    base_logits = logits(model.params(), cfg, ids, mask)
    np.testing.assert_allclose(logits(lora.with_dropout(zero_b, jax.random.key(5), 0.5), cfg, ids, mask),
                               base_logits, atol=1e-6 * float(np.abs(base_logits).max()), rtol=0)
