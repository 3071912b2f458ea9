"""Gemma 3, OLMo 3, SmolLM3 and yarn rope against transformers; attention sinks against numpy.

Every family: a tiny random float32 PyTorch model (tests/models/family_models.py), logits within
1e-4 of transformers on padded batches, again after export and reload; the KV cache, the
shared-prompt forward and greedy generation on the same layers.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import generation, models
from distillm2_jax.cli import main
from distillm2_jax.hf import from_pretrained, save_pretrained
from distillm2_jax.models import attention, decoder, rope
from distillm2_jax.models.config import NO_ROPE, UnsupportedConfigError, from_hf
from tests.models.family_models import DENSE_FAMILIES, build_dense_model, dense_config
from tests.tiny_models import VOCAB, padded_batch, torch_logits

TOL = 1e-4
FAMILIES = sorted(DENSE_FAMILIES) + ["gemma3"]


def _max_err(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (folder, torch model, our Decoder), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            torch_model = build_dense_model(family, d)
            cache[family] = (d, torch_model, from_pretrained(d, dtype=jnp.float32))
        return cache[family]

    return get


# ----------------------------------------------------------------------------- parity

LONG_ROWS = ("qwen3_yarn",)   # also 200 positions (3 causal query blocks), far past yarn's original 8


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_torch_on_padded_rows(built, family):
    """Left-padded rows of 12 (windows of 4; yarn's original contexts are 8 and 16 tokens), and
    right-padded rows of 200 for LONG_ROWS."""
    d, torch_model, model = built(family)
    batches = [(1, (11, 7), 12, True)] + ([(4, (190, 131), 200, False)] if family in LONG_ROWS else [])
    for seed, lengths, total, left in batches:
        ids, mask = padded_batch(seed=seed, lengths=lengths, total=total, left=left)
        ref = torch_logits(torch_model, ids, mask)
        assert np.abs(ref[mask.astype(bool)]).std() > 0.5, "logits too small for a meaningful check"
        assert _max_err(model(ids, attention_mask=mask), ref, mask) <= TOL, (family, total)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_transformers(built, family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    d, torch_model, model = built(family)
    out = save_pretrained(model, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, mask = padded_batch(seed=2)
    assert _max_err(model(ids, attention_mask=mask), torch_logits(reloaded, ids, mask), mask) <= TOL
    ours_again = from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(ours_again(ids, attention_mask=mask)),
                                  np.asarray(model(ids, attention_mask=mask)))
    if family == "gemma3":  # the text model is written as a Gemma3ForCausalLM
        assert type(reloaded).__name__ == "Gemma3ForCausalLM"
        return
    orig = dict(torch_model.state_dict())
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), orig[name].numpy(), err_msg=name)


def test_configs_exercise_the_distinctive_parts(built):
    g3 = built("gemma3_text")[2].config
    assert g3.layer_windows == (4, 4, 4, 4, 4, 0) and g3.qk_norm and g3.final_softcap is None
    assert [g3.rope_specs[i].theta for i in g3.layer_rope_index] == [1e4] * 5 + [1e6]
    assert g3.rope_specs[g3.layer_rope_index[5]].rope_type == "linear"
    olmo = built("olmo3")[2].config
    assert not olmo.pre_norm and olmo.qk_norm_full and olmo.layer_windows == (4, 0, 4, 0)
    assert [olmo.rope_specs[i].rope_type for i in olmo.layer_rope_index] == ["default", "yarn"] * 2
    smol = built("smollm3")[2].config
    assert [smol.rope_specs[i].rope_type for i in smol.layer_rope_index] == ["default", "none"] * 2
    (yarn,) = built("qwen3_yarn")[2].config.rope_specs
    assert yarn.rope_type == "yarn" and yarn.factor == 4.0 and yarn.attention_factor > 1.0


def test_inspect_checks_an_image_text_gemma3(built, capsys):
    d, _, _ = built("gemma3")
    assert main(["inspect", str(d), "--check-logits"]) == 0
    out = capsys.readouterr().out
    assert "gemma3_text" in out
    assert float(out.split("max |diff| ")[1].split(",")[0]) < TOL


# ----------------------------------------------------------------------------- the KV cache

@pytest.fixture(scope="module")
def mixed():
    """A random decoder mixing this file's new layer parts (no HF twin; its layers are held to
    transformers above): OLMo 3's post-norms and full q/k norms, a window of 4 on layer 0,
    yarn on layer 0 and NoPE on layer 1, and attention sinks."""
    base = from_hf(dense_config("olmo3", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]))
    yarn = next(s for s in base.rope_specs if s.rope_type == "yarn")
    cfg = dataclasses.replace(base, attn_sinks=True, ropes=(yarn, NO_ROPE), layer_rope=(0, 1))
    params = jax.jit(lambda key: decoder.init_params(cfg, key, init_std=0.2))(jax.random.key(3))
    params["layers"]["sinks"] = 2.0 * jax.random.normal(jax.random.key(4), params["layers"]["sinks"].shape)
    return cfg, params


def test_kv_cache_decoding_equals_full_forward(mixed):
    """Prefill, then one token at a time: each layer's rope, window and sinks in the cached
    attention. (Gemma 3's cache is held to transformers by the greedy test below.)"""
    cfg, params = mixed
    ids, mask = padded_batch(seed=4, lengths=(9, 5), total=14, left=True)
    logits = jax.jit(lambda p, i, m: decoder.logits_from_hidden(p, cfg, decoder.forward(p, cfg, i, m)[0]))
    full = np.asarray(logits(params, ids, mask))
    step = jax.jit(lambda p, i, m, c: decoder.forward(p, cfg, i, m, cache=c))
    cache = models.init_cache(cfg, batch=2, max_length=16)
    hidden, cache = step(params, ids[:, :9], mask[:, :9], cache)
    got = [decoder.logits_from_hidden(params, cfg, hidden)]
    for t in range(9, ids.shape[1]):
        hidden, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(decoder.logits_from_hidden(params, cfg, hidden))
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    np.testing.assert_allclose(got[mask.astype(bool)], full[mask.astype(bool)], atol=2e-5, rtol=1e-5)


def test_forward_pairs_equals_the_rows_forward(mixed):
    """A prompt run once for its two responses: per-layer ropes, windows and sinks in both halves."""
    cfg, params = mixed
    rng = np.random.default_rng(5)
    P, R, lp, lr = 7, 6, (7, 4), (6, 3, 5, 2)
    pid, pm = np.zeros((2, P), np.int32), np.zeros((2, P), np.int32)
    rid, rm = np.zeros((4, R), np.int32), np.zeros((4, R), np.int32)
    ids, mask = np.zeros((4, P + R), np.int32), np.zeros((4, P + R), np.int32)
    for b in range(2):
        pid[b, P - lp[b]:], pm[b, P - lp[b]:] = rng.integers(3, VOCAB, lp[b]), 1
    for r in range(4):
        b = r // 2
        rid[r, :lr[r]], rm[r, :lr[r]] = rng.integers(3, VOCAB, lr[r]), 1
        row = np.concatenate([pid[b, P - lp[b]:], rid[r, :lr[r]]])
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    hp, hr = jax.jit(lambda p: decoder.forward_pairs(p, cfg, pid, pm, rid, rm))(params)
    h = np.asarray(jax.jit(lambda p: decoder.forward(p, cfg, ids, mask)[0])(params))
    for r in range(4):
        b = r // 2
        np.testing.assert_allclose(np.asarray(hp)[b, P - lp[b]:], h[r, :lp[b]], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(hr)[r, :lr[r]], h[r, lp[b]:lp[b] + lr[r]], atol=2e-5, rtol=1e-5)


def test_lora_on_every_target_merges_to_the_same_logits(mixed):
    """LoRA (q, k, v, o, gate, up, down) on the mixed layers: merged weights give the adapted logits."""
    from distillm2_jax.models import lora

    cfg, params = mixed
    adapted = lora.add(params, cfg, rank=2, alpha=4.0, key=jax.random.key(1))
    adapted["layers"] = {k: (0.1 * jax.random.normal(jax.random.key(7), v.shape) if k.endswith("_lora_b") else v)
                         for k, v in adapted["layers"].items()}
    ids, mask = padded_batch(seed=6)
    run = jax.jit(lambda p: decoder.logits_from_hidden(p, cfg, decoder.forward(p, cfg, ids, mask)[0]))
    got, merged, base = (np.asarray(run(p)) for p in (adapted, lora.merge(adapted), params))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], merged[valid], atol=2e-5, rtol=1e-5)
    assert np.abs(got - base)[valid].max() > 1e-2


def test_gemma3_greedy_generation_matches_transformers(built):
    """The sampler (KV cache, left-padded prompts, 5:1 local/global layers) against HF generate."""
    import torch

    _, torch_model, model = built("gemma3_text")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (11, 7, 3, 9)]
    ours = [r.tokens for r in generation.sample(model, prompts, max_new_tokens=10, temperature=0.0,
                                                eos_ids=(), batch_size=4)]
    total = max(map(len, prompts))
    ids = np.zeros((4, total), np.int64)
    mask = np.zeros((4, total), np.int64)
    for i, p in enumerate(prompts):
        ids[i, total - len(p):], mask[i, total - len(p):] = p, 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == out[:, total:].numpy().tolist()


# ----------------------------------------------------------------------------- yarn

YARN_CASES = {
    "defaults": dict(factor=4.0, original_max_position_embeddings=32),
    "no_truncate_betas": dict(factor=8.0, original_max_position_embeddings=64, truncate=False,
                              beta_fast=16.0, beta_slow=2.0),
    "mscale": dict(factor=16.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.7),
    "attention_factor": dict(factor=4.0, original_max_position_embeddings=32, attention_factor=1.3),
    "gpt_oss": dict(factor=32.0, original_max_position_embeddings=4096, truncate=False, rope_theta=150000.0,
                    beta_fast=32.0, beta_slow=1.0),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_frequencies_equal_transformers(case):
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": 10000.0, **YARN_CASES[case]}
    hf = Qwen3Config(**dict(TEXT_SHAPE, head_dim=64), rope_parameters=params,
                     max_position_embeddings=int(params["factor"] * params["original_max_position_embeddings"]))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    (spec,) = from_hf(hf).rope_specs
    np.testing.assert_allclose(rope.inv_frequencies(spec, 64), inv_freq.numpy(), rtol=1e-6)
    assert spec.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    plain = rope.inv_frequencies(dataclasses.replace(spec, rope_type="default"), 64)
    assert np.abs(rope.inv_frequencies(spec, 64) / plain - 1).max() > 0.5, "yarn should rescale"


def test_per_layer_type_yarn_always_truncates_as_transformers():
    """transformers reads yarn's `truncate` from the top level of rope_parameters only."""
    from transformers import Olmo3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    full = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
            "rope_theta": 500000.0, "truncate": False}
    hf = Olmo3Config(**TEXT_SHAPE, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                     max_position_embeddings=512,
                     rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default"}})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu", layer_type="full_attention")
    cfg = from_hf(hf)
    spec = cfg.rope_specs[cfg.layer_rope_index[1]]
    assert spec.truncate
    np.testing.assert_allclose(rope.inv_frequencies(spec, cfg.head_dim), inv_freq.numpy(), rtol=1e-6)


TEXT_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def test_unsupported_rope_and_layer_settings_name_the_field():
    from transformers import Gemma3TextConfig, Qwen3Config, SmolLM3Config

    with pytest.raises(UnsupportedConfigError, match="'dynamic' is not supported: transformers rescales"):
        from_hf(Qwen3Config(**TEXT_SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                           "rope_theta": 1e4}))
    with pytest.raises(UnsupportedConfigError, match="use_bidirectional_attention"):
        from_hf(Gemma3TextConfig(**TEXT_SHAPE, use_bidirectional_attention=True))
    bad = SmolLM3Config(**TEXT_SHAPE)
    bad.no_rope_layers = [1, 2]
    with pytest.raises(Exception, match="no_rope_layers"):
        from_hf(bad)
    nested = Qwen3Config(**TEXT_SHAPE)
    nested.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(UnsupportedConfigError, match="per layer type are not supported for qwen3"):
        from_hf(nested)


# ----------------------------------------------------------------------------- attention sinks

def _numpy_sink_attention(q, k, v, mask, sinks, scale):
    """Independent reference: per (row, head, query) softmax over [visible keys..., sink], sink dropped."""
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    out = np.zeros((B, T, Hq, D))
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, :, h // G].astype(np.float64), v[b, :, h // G].astype(np.float64)
            for t in range(T):
                logits = (kh @ q[b, t, h].astype(np.float64)) * scale
                logits = np.where(mask[b, t], logits, -np.inf)
                both = np.append(logits, float(sinks[h]))
                p = np.exp(both - both.max())
                p /= p.sum()
                out[b, t, h] = p[:-1] @ vh
    return out.reshape(B, T, Hq * D)


def test_attention_sinks_match_numpy():
    """Blocked training attention (2 causal query blocks) and cached attention, with left
    padding and a window of 5; rows without a visible key give zeros, as in numpy."""
    cfg = models.ModelConfig(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
                             attn_sinks=True)
    rng = np.random.default_rng(0)
    B, T = 2, 130
    q, k, v = (rng.normal(size=(B, T, h, 8)).astype(np.float32) for h in (4, 2, 2))
    sinks = np.array([-1.0, 0.5, 3.0, 10.0], np.float32)
    valid = np.ones((B, T), bool)
    valid[1, :40] = False
    dist = np.arange(T)[:, None] - np.arange(T)[None]
    mask = valid[:, None, :] & (dist >= 0) & (dist < 5)
    want = _numpy_sink_attention(q, k, v, mask, sinks, cfg.scale)
    assert len(attention.causal_query_blocks(T)) == 2
    got = attention.blocked_attention(cfg, q, k, v, mask, jnp.float32, sinks=jnp.asarray(sinks))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    got = attention.cached_attention(cfg, q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                                     jnp.float32, sinks=jnp.asarray(sinks))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    # a sink takes probability mass: the output is not the plain softmax's
    plain = attention.blocked_attention(cfg, q, k, v, mask, jnp.float32)
    assert np.abs(np.asarray(plain) - want).max() > 0.1
