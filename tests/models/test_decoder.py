"""Decoder behaviour beyond HF parity: KV cache, remat, dtypes, vocab alignment, sharded init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import models
from distillm2_jax import sharding as shd
from distillm2_jax.hf import from_pretrained, save_pretrained
from distillm2_jax.models import attention, decoder, kv_cache
from tests.tiny_models import FAMILIES, hf_config, padded_batch


@pytest.fixture(scope="module", params=["gemma2", "qwen3", "mistral"])
def model(request):
    return models.from_config(hf_config(request.param, initializer_range=0.2), seed=0)


def test_kv_cache_decoding_equals_full_forward(model):
    """Prefill a left-padded prompt, then decode token by token: logits equal the full pass."""
    cfg, params = model.config, model.params()
    ids, mask = padded_batch(seed=4, lengths=(9, 5), total=14, left=True)
    prompt_len = 9
    full = np.asarray(model(ids, attention_mask=mask))
    step = jax.jit(lambda p, i, m, c: decoder.forward(p, cfg, i, m, cache=c), donate_argnums=3)
    cache = models.init_cache(cfg, batch=2, max_length=16)
    hidden, cache = step(params, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    got = [models.logits_from_hidden(params, cfg, hidden)]
    for t in range(prompt_len, ids.shape[1]):
        hidden, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(models.logits_from_hidden(params, cfg, hidden))
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=2e-5, rtol=1e-5)
    assert cache.index.tolist() == [ids.shape[1]] * 2
    assert cache.k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 16, cfg.head_dim)


def test_rows_inserted_at_different_lengths_decode_at_their_own_index(model):
    """Two rows prefilled apart (prompts of 6 and 3 tokens) and put into one cache with
    `insert_rows` (into the reverse slots, over stale entries) decode together, each writing at
    its own index: every step's logits equal each sequence's own full forward."""
    cfg, params = model.config, model.params()
    ids, _ = padded_batch(seed=5, lengths=(12, 12), total=12, left=False)
    seqs, starts = [ids[0], ids[1, :8]], [6, 3]
    step = jax.jit(lambda p, i, m, c: decoder.forward(p, cfg, i, m, cache=c))
    cache = models.init_cache(cfg, batch=2, max_length=16)
    stale = jnp.ones((2, 16), bool)
    cache = cache._replace(k=cache.k + 1.0, valid=stale, index=jnp.array([9, 9], jnp.int32))
    for slot, (seq, start) in zip((1, 0), zip(seqs, starts)):
        one = models.init_cache(cfg, batch=1, max_length=start)
        _, one = step(params, seq[None, :start], np.ones((1, start), bool), one)
        cache = kv_cache.insert_rows(cache, one, jnp.array([slot, 2], jnp.int32))  # row 2: dropped
    assert cache.index.tolist() == [3, 6]
    fulls = [np.asarray(model(seq[None]))[0] for seq in seqs]
    for t in range(5):
        feed = np.array([[seqs[1][starts[1] + t]], [seqs[0][starts[0] + t]]])
        hidden, cache = step(params, feed, np.ones((2, 1), bool), cache)
        logits = np.asarray(models.logits_from_hidden(params, cfg, hidden))[:, 0]
        np.testing.assert_allclose(logits[1], fulls[0][starts[0] + t], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(logits[0], fulls[1][starts[1] + t], atol=2e-5, rtol=1e-5)
    assert cache.index.tolist() == [8, 11]


@pytest.mark.parametrize("length", [1, 63, 64, 200, 512, 1000])
def test_causal_query_blocks_tile_the_sequence(length):
    blocks = attention.causal_query_blocks(length)
    assert blocks[0][0] == 0 and blocks[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])), blocks
    assert 1 <= len(blocks) <= attention.MAX_QUERY_BLOCKS
    assert len(blocks) == 1 or min(hi - lo for lo, hi in blocks) >= attention.MIN_QUERY_BLOCK // 2


def test_query_blocks_equal_one_block_in_values_and_gradients(model):
    """Blocked causal attention = the full [T, T] square at every real position, and in grads."""
    cfg, params = model.config, model.params()
    ids, mask = padded_batch(seed=6, lengths=(150, 97), total=160, left=False)
    weight = jnp.asarray(mask, jnp.float32)[..., None]

    def run(max_query_blocks):
        def loss(p):
            h, _ = decoder.forward(p, cfg, ids, mask, max_query_blocks=max_query_blocks)
            return jnp.sum(models.logits_from_hidden(p, cfg, h) ** 2 * weight), h
        (val, h), grad = jax.value_and_grad(loss, has_aux=True)(params)
        return val, np.asarray(h)[mask.astype(bool)], grad

    assert len(attention.causal_query_blocks(160)) == 2
    assert len(attention.causal_query_blocks(160, max_blocks=1)) == 1
    blocked, square = run(attention.MAX_QUERY_BLOCKS), run(1)
    np.testing.assert_allclose(blocked[0], square[0], rtol=1e-5)
    np.testing.assert_allclose(blocked[1], square[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(blocked[2]), jax.tree.leaves(square[2])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))


def test_3d_linear_layers_equal_2d(model):
    """`flatten_linear=False` (the benchmark's alternative) gives the same hidden states."""
    cfg, params = model.config, model.params()
    ids, mask = padded_batch(seed=8)
    flat = np.asarray(decoder.forward(params, cfg, ids, mask)[0])
    three_d = np.asarray(decoder.forward(params, cfg, ids, mask, flatten_linear=False)[0])
    np.testing.assert_allclose(three_d, flat, atol=1e-5, rtol=1e-5)


def test_remat_keeps_values_and_gradients():
    model = models.from_config(hf_config("gemma2", initializer_range=0.2), seed=0)
    cfg, params = model.config, model.params()
    ids, mask = padded_batch(seed=5)

    def loss(p, remat):
        h, _ = decoder.forward(p, cfg, ids, mask, remat=remat)
        return jnp.mean(models.logits_from_hidden(p, cfg, h) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_val, ref_grad = grad_fn(params, "none")
    for policy in ("full", "dots"):
        val, grad = grad_fn(params, policy)
        np.testing.assert_allclose(val, ref_val, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            # recomputation reorders float sums: compare at 1e-5 of each gradient's own scale
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="remat 'sometimes'"):
        loss(params, "sometimes")


def test_bfloat16_params_and_compute(tmp_path):
    cfg = hf_config("qwen2", initializer_range=0.2)
    m32 = models.from_config(cfg, seed=1)
    path = save_pretrained(m32, tmp_path / "m")
    m16 = from_pretrained(path, dtype=jnp.bfloat16)
    assert m16.layers["q"][...].dtype == jnp.bfloat16
    mixed = from_pretrained(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    ids, mask = padded_batch(seed=6)
    ref = np.asarray(m32(ids, attention_mask=mask))
    for m in (m16, mixed):
        out = m(ids, attention_mask=mask)
        assert out.dtype == jnp.float32  # logits are always float32
        err = np.abs(np.asarray(out) - ref)[mask.astype(bool)]
        assert err.max() < 0.25 and err.mean() < 0.05, (err.max(), err.mean())


def test_align_vocab_slices_logits_not_weights():
    teacher = models.from_config(hf_config("qwen2", vocab_size=112), seed=1)
    student = models.from_config(hf_config("qwen2", vocab_size=96, tie_word_embeddings=True), seed=2)
    ids, mask = padded_batch(seed=7)
    full = np.asarray(teacher(ids, attention_mask=mask))
    assert models.align_vocab(90, teacher, student) == 90
    assert teacher(ids, attention_mask=mask).shape[-1] == 90
    assert student.output_head().shape == (64, 90)
    np.testing.assert_allclose(np.asarray(teacher(ids, attention_mask=mask)), full[..., :90], rtol=1e-6)
    assert teacher.embed[...].shape == (112, 64)  # export still writes the full head
    with pytest.raises(Exception, match="fewer than the shared vocabulary of 100"):
        models.align_vocab(100, teacher, student)


def test_from_config_honours_initializer_range():
    for std in (0.02, 0.5):
        q = np.asarray(models.from_config(hf_config("llama", initializer_range=std), seed=0).layers["q"][...])
        assert abs(q.std() - std) < 0.1 * std


def test_from_config_creates_sharded_params():
    mesh = shd.make_mesh((2, 1, 4))
    m = models.from_config(hf_config("llama"), seed=0, mesh=mesh)
    gate = m.layers["gate"][...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    single = models.from_config(hf_config("llama"), seed=0)
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(single.layers["gate"][...]))


def test_logical_rules_skip_axes_that_do_not_divide():
    mesh = shd.make_mesh((1, 2, 4))
    # 2 KV heads * 16 = 32 columns divide by 4, 6 do not: tensor axis dropped, fsdp kept.
    assert shd.logical_to_spec(("embed", "kv_heads"), (64, 32), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "kv_heads"), (64, 6), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert shd.logical_to_spec(("batch", None), (8, 3), shd.make_mesh((2, 4, 1))) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None)


def test_make_mesh_errors():
    with pytest.raises(Exception, match=r"needs 16 devices, have 8"):
        shd.make_mesh((2, 8, 1))
    assert shd.make_mesh((1, 1, 1)).devices.size == 1
    assert shd.make_mesh((2, -1, 1)).shape["fsdp"] == 4


def _pairs_and_rows(seed, B=3, P=7, R=9):
    """B left-padded prompts [B, P], 2B right-padded responses [2B, R] (pair-major: rows 2b and
    2b + 1 continue prompt b), and the same 2B sequences as right-padded [prompt | response] rows."""
    rng = np.random.default_rng(seed)
    lp = rng.integers(1, P + 1, size=B)
    lp[0] = P
    lr = rng.integers(0, R + 1, size=2 * B)
    lr[1] = R
    pid, pm = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
    rid, rm = np.zeros((2 * B, R), np.int32), np.zeros((2 * B, R), np.int32)
    ids, mask = np.zeros((2 * B, P + R), np.int32), np.zeros((2 * B, P + R), np.int32)
    for b in range(B):
        pid[b, P - lp[b]:] = rng.integers(3, 96, size=lp[b])
        pm[b, P - lp[b]:] = 1
    for r in range(2 * B):
        b = r // 2
        rid[r, :lr[r]] = rng.integers(3, 96, size=lr[r])
        rm[r, :lr[r]] = 1
        ids[r, :lp[b]] = pid[b, P - lp[b]:]
        ids[r, lp[b]:lp[b] + lr[r]] = rid[r, :lr[r]]
        mask[r, :lp[b] + lr[r]] = 1
    return (pid, pm, rid, rm), (ids, mask), lp, lr


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_pairs_equals_the_rows_forward(family):
    """A prompt run once for its two responses gives every real token the hidden state of the
    [prompt | response] row: positions, causality, windows (mistral 5, gemma2 4) and soft-caps."""
    model = models.from_config(hf_config(family, initializer_range=0.2), seed=0)
    cfg, params = model.config, model.params()
    (pid, pm, rid, rm), (ids, mask), lp, lr = _pairs_and_rows(1)
    hp, hr = jax.jit(lambda p: decoder.forward_pairs(p, cfg, pid, pm, rid, rm))(params)
    h = np.asarray(decoder.forward(params, cfg, ids, mask)[0])
    hp, hr = np.asarray(hp), np.asarray(hr)
    P = pid.shape[1]
    for r in range(rid.shape[0]):
        b = r // 2
        np.testing.assert_allclose(hp[b, P - lp[b]:], h[r, :lp[b]], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(hr[r, :lr[r]], h[r, lp[b]:lp[b] + lr[r]], atol=2e-5, rtol=1e-5)


def test_forward_pairs_remat_keeps_values_and_gradients():
    model = models.from_config(hf_config("mistral", initializer_range=0.2), seed=0)
    cfg, params = model.config, model.params()
    (pid, pm, rid, rm), _, _, _ = _pairs_and_rows(2)

    def loss(p, remat):
        hp, hr = decoder.forward_pairs(p, cfg, pid, pm, rid, rm, remat=remat)
        logits = lambda h: models.logits_from_hidden(p, cfg, h)  # noqa: E731
        return jnp.mean(logits(hp[:, -1]) ** 2) + jnp.mean(logits(hr) ** 2 * rm[..., None])

    base = jax.jit(jax.value_and_grad(lambda p: loss(p, "none")))(params)
    full = jax.jit(jax.value_and_grad(lambda p: loss(p, "full")))(params)
    np.testing.assert_allclose(full[0], base[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(base[1])):
        # recomputation reorders float sums: compare at 1e-5 of each gradient's own scale
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="2 responses per prompt"):
        decoder.forward_pairs(params, cfg, pid, pm, rid[:5], rm[:5])


def test_forward_pairs_keeps_batch_sharded_pairs_on_their_device():
    """On 8 devices with prompts and pair-major responses sharded over the batch, the compiled
    forward and backward move no activations between devices."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    mesh = shd.make_mesh((8, 1, 1))
    model = models.from_config(hf_config("qwen2", initializer_range=0.2), seed=0, mesh=mesh)
    cfg = model.config
    on_rows = NamedSharding(mesh, PartitionSpec(shd.batch_axes(mesh), None))
    prompts = jax.device_put(np.ones((8, 16), np.int32), on_rows)
    responses = jax.device_put(np.ones((16, 24), np.int32), on_rows)

    def total(p, prompts, responses):
        hp, hr = decoder.forward_pairs(p, cfg, prompts, prompts, responses, responses)
        return jnp.sum(hp) + jnp.sum(hr)

    hlo = jax.jit(jax.grad(total)).lower(model.params(), prompts, responses).compile().as_text()
    for op in ("all-to-all", "collective-permute", "all-gather"):
        assert not re.search(rf"\b{op}(-start)?\(", hlo), op
    assert "s32[1,16]" in hlo and "s32[2,24]" in hlo   # the program is per-device: one pair each
