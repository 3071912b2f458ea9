"""The quantized student (`model.quantization`): its int4/int8 weights against an independent numpy
quantizer, the dequantizing and fake-quantizing `linear`, a QLoRA run (frozen int4 base, LoRA
trains, loss falls) whose export loads in transformers with the logits of the quantized forward,
and a QAT run (the full weights train through fake quantization)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax.config.errors import ConfigError
from distillm2_jax.config.schema import QuantizationSection
from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.models import decoder, layer, quant
from distillm2_jax.train import student as student_lib
from distillm2_jax.train.export import export_run, restore_student
from distillm2_jax.train.loop import Trainer
from tests.tiny_run import build_tiny_run, tiny_config


def numpy_quantize(w: np.ndarray, bits: int, group: int):
    """Grouped symmetric quantization of a kernel [L, in, out], written from the format's
    definition: per (layer, group of `group` inputs, output column), scale = max|w| / (2^(b-1) - 1/2)
    (1 where the group is all zeros), code = round-half-even(w / scale) clipped to the b-bit
    range. Returns (codes [L, in, out], scales [L, in / group, out])."""
    L, n_in, n_out = w.shape
    group = group or n_in
    g = w.reshape(L, n_in // group, group, n_out)
    absmax = np.abs(g).max(axis=2)
    scale = (absmax / np.float32(2 ** (bits - 1) - 0.5)).astype(np.float32)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale)
    codes = np.clip(np.round(g / scale[:, :, None, :]), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return codes.reshape(w.shape).astype(np.int64), scale


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 0), (8, 32)])
def test_quantize_matches_numpy_and_round_trips_within_half_a_step(bits, group):
    rng = np.random.default_rng(bits + group)
    w = (rng.standard_normal((2, 64, 24)) * rng.uniform(0.01, 2.0, size=(1, 1, 24))).astype(np.float32)
    w[0, :16, 3] = 0.0                     # an all-zero group
    q = quant.quantize(jnp.asarray(w), quant.QuantSpec(bits=bits, group_size=group))
    codes, scale = numpy_quantize(w, bits, group)
    assert q.qvalue.dtype == (jnp.int4 if bits == 4 else jnp.int8)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6, atol=0)
    got = np.asarray(q.qvalue).astype(np.int64)
    step = np.repeat(scale, (group or 64), axis=1)
    # A group's largest |w| lands exactly on the half-way point 2^(b-1) - 1/2, where XLA's and
    # numpy's division may differ by one ulp and so round to neighbouring codes: allowed there only.
    ratio = np.abs(w / step)
    tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-5
    assert np.all((got == codes) | (tie & (np.abs(got - codes) == 1)))
    deq = np.asarray(quant.dequantize(q))
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6 * np.abs(w))   # half a step, up to float rounding
    assert np.all(deq[0, :16, 3] == 0)
    assert np.unique(np.round(deq / step)).size <= 2 ** bits


def test_group_size_must_divide_every_projection():
    with pytest.raises(ValueError, match="'down'"):
        quant.check_shapes({"q": jnp.zeros((1, 32, 32)), "down": jnp.zeros((1, 48, 32))}, quant.QuantSpec(4, 32))


def test_linear_dequantizes_and_fake_quant_passes_the_gradient_straight_through():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    spec = quant.QuantSpec(4, 8)
    q = quant.quantize(w, spec)
    deq = quant.dequantize(q)
    want = np.asarray(x) @ np.asarray(deq)
    np.testing.assert_allclose(layer.linear(x, {"q": q}, "q"), want, rtol=1e-5, atol=1e-5)
    marked = {"q_fake_quant": quant.FakeQuant(spec)}
    np.testing.assert_allclose(layer.linear(x, {"q": w, **marked}, "q"), want, rtol=1e-5, atol=1e-5)
    # straight-through: d loss / d w is the gradient of the dense layer taken at the quantized weight
    grad_fq = jax.grad(lambda w: jnp.sum(jnp.sin(layer.linear(x, {"q": w, **marked}, "q"))))(w)
    grad_dense = jax.grad(lambda v: jnp.sum(jnp.sin(layer.linear(x, {"q": v}, "q"))))(deq)
    np.testing.assert_allclose(grad_fq, grad_dense, rtol=1e-5, atol=1e-5)
    assert quant.TARGETS == layer.LORA_TARGETS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 8 pairs and a global batch of 8: every step sees the same pairs, so the loss must fall
    return build_tiny_run(tmp_path_factory.mktemp("tiny_quant"), num_prompts=8)


def _layers_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_group_size_is_a_config_error(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **{"lora.enabled": "true", "model.quantization.mode": "qlora",
                                         "model.quantization.group_size": 24})
    with pytest.raises(ConfigError, match=r"model\.quantization\.group_size: group_size 24 does not divide"):
        student_lib.load(cfg, None)
    with pytest.raises(ConfigError, match=r"model\.quantization\.mode: qlora trains LoRA"):
        tiny_config(tiny, tmp_path, **{"model.quantization.mode": "qlora"})


def test_qlora_student_trains_lora_on_a_frozen_int4_base_and_exports_to_transformers(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "qlora"
    cfg = tiny_config(tiny, run_dir, **{
        "lora.enabled": "true", "lora.rank": 4, "lora.alpha": 8, "lora.dropout": 0.0,
        "model.quantization.mode": "qlora", "model.quantization.bits": 4, "model.quantization.group_size": 16,
        "objective.name": "kd", "train.epochs": 6, "optim.lr": "2e-2", "checkpoint.every_steps": 100})
    trainer = Trainer(cfg, log=lambda *a: None)
    base = from_pretrained(tiny["student"]).params()["layers"]
    spec = quant.QuantSpec(4, 16)
    frozen_before = jax.tree.map(np.asarray, trainer.frozen)
    result = trainer.run()
    losses = [h["loss"] for h in result.history]
    assert result.steps == 6 and losses[-1] < losses[0] - 0.05, losses

    # the base is stored as int4 codes, equal to quantizing the checkpoint, and never changed
    for name in quant.TARGETS:
        q = trainer.frozen["layers"][name]
        assert quant.is_quantized(q) and q.qvalue.dtype == jnp.int4
        _layers_equal(q, quant.quantize(base[name], spec))
        assert q.qvalue.nbytes * 4 <= base[name].nbytes
    _layers_equal(trainer.frozen, frozen_before)
    # only the adapters train, and they moved
    trained = trainer.state.trainable["layers"]
    assert sorted(trained) == sorted(f"{t}_lora_{ab}" for t in quant.TARGETS for ab in "ab")
    assert float(jnp.abs(trained["q_lora_b"]).max()) > 0

    # export: dequantized base + merged LoRA, loadable by transformers, same logits as our
    # quantized forward (int4 codes dequantized on the fly, LoRA unmerged)
    out = export_run(run_dir, tmp_path / "hf")
    ids = np.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = (ids != 0).astype(np.int64)
    params = trainer.student_parts.params(trainer.state.trainable)
    hidden, _ = decoder.forward(params, trainer.student_parts.config, jnp.asarray(ids), jnp.asarray(mask))
    ours = np.asarray(decoder.logits_from_hidden(params, trainer.student_parts.config, hidden))
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], ref[keep][:, : ours.shape[-1]], atol=1e-4, rtol=0)
    exported = restore_student(run_dir).params()["layers"]
    assert np.abs(np.asarray(exported["q"]) - np.asarray(quant.dequantize(quant.quantize(base["q"], spec)))).max() > 0


def test_qat_student_forward_gradient_sampling_and_export_agree():
    """QAT without the trainer: the step's forward quantizes, the gradient reaches the full
    weights straight through, and sampling / export use exactly the fake-quantized weights."""
    from distillm2_jax import models
    from tests.tiny_models import hf_config, padded_batch

    model = models.from_config(hf_config("qwen2", hidden_size=32, intermediate_size=64, initializer_range=0.2),
                               seed=0)
    qcfg = QuantizationSection(mode="qat", bits=4, group_size=16)
    st = student_lib.from_model(model, None, quantization=qcfg)
    spec = quant.QuantSpec(4, 16)
    assert sorted(st.trainable["layers"]) == sorted(model.params()["layers"])       # the full model trains
    assert quant.is_quantized(st.model.params()["layers"]["down"])                  # epoch 1 samples quantized
    ids, mask = (jnp.asarray(a) for a in padded_batch(seed=2))

    @jax.jit
    def loss(trainable):
        params = student_lib.forward_params(trainable, st.frozen)
        hidden, _ = decoder.forward(params, st.config, ids, mask)
        logits = decoder.logits_from_hidden(params, st.config, hidden)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(st.trainable)
    want = np.asarray(student_lib.quantize_model(model, spec)(ids, mask))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0)
    assert all(float(jnp.abs(grads["layers"][t]).max()) > 0 for t in quant.TARGETS)
    samp, _, _ = st.for_sampling(st.trainable)
    merged = st.merged(st.trainable).params()["layers"]
    for t in quant.TARGETS:
        fq = np.asarray(quant.fake_quantize(st.trainable["layers"][t], spec))
        np.testing.assert_array_equal(np.asarray(quant.dequantize(samp["layers"][t])), fq)
        np.testing.assert_array_equal(np.asarray(merged[t]), fq)


@pytest.mark.slow
def test_qat_student_trains_its_full_weights_through_fake_quantization(tiny, tmp_path):
    run_dir = tmp_path / "qat"
    cfg = tiny_config(tiny, run_dir, **{
        "model.quantization.mode": "qat", "model.quantization.bits": 8, "model.quantization.group_size": 0,
        "train.epochs": 1, "optim.lr": "1e-2"})
    trainer = Trainer(cfg, log=lambda *a: None)
    spec = quant.QuantSpec(8, 0)
    assert all(trainer.frozen["layers"][f"{t}_fake_quant"] == quant.FakeQuant(spec) for t in quant.TARGETS)
    # epoch 1 samples from the quantized student: the model holds the quantized weights
    assert quant.is_quantized(trainer.student.params()["layers"]["up"])
    w0 = np.asarray(trainer.trainable0["layers"]["up"])
    result = trainer.run()
    assert result.steps == 1 and np.isfinite(result.final_metrics["loss"])
    w1 = trainer.state.trainable["layers"]["up"]
    assert w1.dtype == jnp.float32 and np.abs(np.asarray(w1) - w0).max() > 0
    # sampling and export use exactly the fake-quantized weights
    samp, model_cfg, _ = trainer.student_parts.for_sampling(trainer.state.trainable)
    assert quant.is_quantized(samp["layers"]["up"])
    exported = restore_student(run_dir).params()["layers"]["up"]
    np.testing.assert_array_equal(np.asarray(exported), np.asarray(quant.fake_quantize(w1, spec)))
    np.testing.assert_array_equal(np.asarray(exported), np.asarray(quant.dequantize(samp["layers"]["up"])))


def test_the_table9_experiment_configures_valid_qlora_runs(tmp_path):
    """experiments/quantized_student.py: both recoveries are valid qlora configs with the demo's budget."""
    import importlib.util
    from pathlib import Path

    from distillm2_jax.demo import run

    path = Path(__file__).resolve().parents[2] / "experiments" / "quantized_student.py"
    spec = importlib.util.spec_from_file_location("quantized_student", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = run.DemoSettings.quick()
    for method in module.methods(4, 128):
        cfg = run.train_config(tmp_path, settings, method.objective, run_name=method.key, overrides=method.overrides)
        assert cfg.model.quantization.mode == "qlora" and cfg.lora.enabled and cfg.train.epochs == settings.epochs
    text = module.table({"a": {"exact_match": 0.5, "nll": 0.1, "acceptance": None}})
    assert text.splitlines()[2].split() == ["a", "0.500", "0.1000", "—"]
