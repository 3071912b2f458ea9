"""The student's lifecycle: the trainable/frozen split with and without LoRA, forwards of the
split params (no-op adapters at init, dropout only in training), merge, and loading a run's
student from an HF folder the same way for the trainer and export."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import config as config_lib
from distillm2_jax import models
from distillm2_jax import sharding as shd
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.hf.save import save_pretrained
from distillm2_jax.models import decoder, lora
from distillm2_jax.train import student as student_lib
from tests.tiny_models import hf_config, padded_batch

LORA = config_lib.LoraSection(enabled=True, rank=4, alpha=8.0, targets=["q", "v", "down"])


@functools.partial(jax.jit, static_argnums=1)
def logits(params, cfg, ids, mask):
    hidden, _ = decoder.forward(params, cfg, ids, mask)
    return decoder.logits_from_hidden(params, cfg, hidden)


def leaf_names(tree) -> set[str]:
    return {"/".join(str(p.key) for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_leaves(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def perturbed(trainable, seed=0):
    """The adapters with random, non-zero B (A as initialised)."""
    rng = np.random.default_rng(seed)
    return {"layers": {k: jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype) if k.endswith("_lora_b") else v
                       for k, v in trainable["layers"].items()}}


@pytest.fixture(scope="module")
def model():
    return models.from_config(hf_config("llama", initializer_range=0.2), seed=0)


@pytest.fixture(scope="module")
def with_lora(model):
    return student_lib.from_model(model, LORA, seed=3)


@pytest.fixture(scope="module")
def batch():
    return padded_batch(seed=1)


@pytest.mark.parametrize("lora_cfg", [None, config_lib.LoraSection(enabled=False, rank=4)])
def test_without_lora_the_whole_model_is_trainable(model, lora_cfg, batch):
    s = student_lib.from_model(model, lora_cfg, seed=3)
    assert s.frozen == {} and not s.has_lora
    assert_same_leaves(s.trainable, model.params())
    assert s.params(s.trainable) is s.trainable
    # no adapters: a training forward (key, rate > 0) adds nothing, merge changes nothing
    key = jax.random.key_data(jax.random.key(0))
    assert student_lib.forward_params(s.trainable, s.frozen, key=key, dropout=0.5) is s.trainable
    assert student_lib.merge(s.trainable) is s.trainable
    ids, mask = batch
    np.testing.assert_array_equal(s.merged(s.trainable)(ids, mask), model(ids, mask))


def test_with_lora_only_the_adapters_are_trainable(model, with_lora):
    s = with_lora
    assert s.has_lora and s.model is model
    want = {f"layers/{t}_lora_{ab}" for t in LORA.targets for ab in "ab"}
    assert leaf_names(s.trainable) == want
    base = leaf_names(model.params())
    scales = {f"layers/{t}_lora_scale" for t in LORA.targets}
    assert leaf_names(s.frozen) == base | scales
    assert_same_leaves({k: v for k, v in s.frozen.items() if k != "layers"},
                       {k: v for k, v in model.params().items() if k != "layers"})
    assert_same_leaves({k: v for k, v in s.frozen["layers"].items() if not k.endswith("_lora_scale")},
                       model.params()["layers"])
    assert not np.any(np.asarray(s.trainable["layers"]["q_lora_b"]))   # B = 0
    combined = student_lib.combine(s.trainable, s.frozen)
    assert leaf_names(combined) == base | scales | want
    assert student_lib.split(combined)[0].keys() == s.trainable.keys()
    assert_same_leaves(student_lib.split(combined)[0], s.trainable)


def test_same_seed_same_adapters(model, with_lora):
    """Export rebuilds the trainer's split from the run's config and seed."""
    assert_same_leaves(student_lib.from_model(model, LORA, seed=3).trainable, with_lora.trainable)
    other = student_lib.from_model(model, LORA, seed=4).trainable
    assert not np.array_equal(other["layers"]["q_lora_a"], with_lora.trainable["layers"]["q_lora_a"])


def test_fresh_adapters_do_not_change_the_forward(model, with_lora, batch):
    ids, mask = batch
    ref = np.asarray(logits(model.params(), model.config, ids, mask))
    got = logits(with_lora.params(with_lora.trainable), model.config, ids, mask)
    np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


def test_merge_equals_the_combined_forward(model, with_lora, batch):
    s, ids, mask = with_lora, *batch
    trained = perturbed(s.trainable)
    combined = np.asarray(logits(s.params(trained), model.config, ids, mask))
    base = np.asarray(logits(model.params(), model.config, ids, mask))
    assert np.abs(combined - base).max() > 1e-2   # the adapters matter
    merged = s.merged(trained)
    assert isinstance(merged, models.Decoder) and merged.hf_config == model.hf_config
    assert leaf_names(merged.params()) == leaf_names(model.params())
    np.testing.assert_allclose(merged(ids, mask), combined, atol=1e-5, rtol=1e-5)
    # only the targets' weights changed
    for name, value in merged.params()["layers"].items():
        assert np.array_equal(value, model.params()["layers"][name]) == (name not in LORA.targets), name


def test_dropout_only_when_training(model, with_lora, batch):
    s, ids, mask = with_lora, *batch
    trained = perturbed(s.trainable)
    key = jax.random.key_data(jax.random.key(7))   # the step's key data (uint32)
    eval_params = student_lib.forward_params(trained, s.frozen)
    assert "lora_dropout_key" not in eval_params["layers"]
    no_rate = student_lib.forward_params(trained, s.frozen, key=key, dropout=0.0)
    assert "lora_dropout_key" not in no_rate["layers"]
    train_params = student_lib.forward_params(trained, s.frozen, key=key, dropout=0.5)
    assert train_params["layers"]["lora_dropout_rate"].shape == (model.config.num_layers,)
    np.testing.assert_array_equal(train_params["layers"]["lora_dropout_rate"], 0.5)

    @jax.jit
    def train_logits(trainable, key):
        params = student_lib.forward_params(trainable, s.frozen, key=key, dropout=0.5)
        return logits(params, model.config, ids, mask)

    ref = np.asarray(logits(eval_params, model.config, ids, mask))
    a = np.asarray(train_logits(trained, key))
    assert np.abs(a - ref).max() > 1e-3
    np.testing.assert_array_equal(train_logits(trained, key), a)   # a function of the key
    other = jax.random.key_data(jax.random.key(8))
    assert np.abs(np.asarray(train_logits(trained, other)) - a).max() > 1e-3
    # the dropout entries never reach the merged weights
    assert leaf_names(student_lib.merge(train_params)) == leaf_names(model.params())


def test_load_from_a_run_config_on_a_mesh(model, tmp_path, batch):
    folder = save_pretrained(model, tmp_path / "student")
    mesh = shd.make_mesh((1, 2, 4))
    overrides = [f"model.student={folder}", f"model.teacher={folder}", "seed=5", "lora.enabled=true",
                 "lora.rank=4", "lora.alpha=8", "lora.targets=[q, down]"]
    cfg = config_lib.load(None, overrides)
    s = student_lib.load(cfg, mesh)
    assert s.model.config == from_pretrained(folder).config
    assert_same_leaves(s.model.params(), model.params())
    assert leaf_names(s.trainable) == {"layers/q_lora_a", "layers/q_lora_b", "layers/down_lora_a",
                                       "layers/down_lora_b"}
    assert s.trainable["layers"]["q_lora_a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert s.model.params()["embed"].sharding.mesh == mesh
    # the adapters follow the config's seed (and not the mesh)
    again = student_lib.from_model(model, cfg.lora, seed=5)
    assert_same_leaves(jax.device_get(s.trainable), jax.device_get(again.trainable))
    # without LoRA, in bfloat16: the whole model in the config's dtype
    plain = student_lib.load(config_lib.load(None, overrides[:2] + ["model.student_dtype=bfloat16"]), mesh)
    assert plain.frozen == {} and plain.trainable["layers"]["q"].dtype == jnp.bfloat16
    ids, mask = batch
    np.testing.assert_allclose(plain.merged(plain.trainable)(ids, mask), model(ids, mask), atol=0.1, rtol=0.05)


def test_add_lora_is_models_lora(model):
    """One implementation: the adapters are `models.lora.add`'s, from key(seed)."""
    params = student_lib.add_lora(model.params(), model.config, LORA, seed=3)
    want = lora.add(model.params(), model.config, rank=4, alpha=8.0, targets=("q", "v", "down"),
                    key=jax.random.key(3))
    assert_same_leaves(params, want)
    base = model.params()
    assert student_lib.add_lora(base, model.config, None) is base
    assert student_lib.add_lora(base, model.config, config_lib.LoraSection(enabled=False)) is base
