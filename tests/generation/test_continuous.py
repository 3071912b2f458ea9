"""Continuous batching: refilled slots give the static path's and HF's tokens, and no weight copy.

The sampler keeps `batch_size` slots decoding and refills a finished row's slot with the next
prompt (`generation.slots`). These tests pin what that must not change: greedy tokens equal
the static batches' and transformers' greedy output (rows of very different prompt and
response lengths, each slot refilled several times, on 8 fake devices), and a seeded row's
tokens depend on (seed, row id, prompt) only. And what it must not cost: decoding holds the
stacked weights once (no unstacked or merged copy beside them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import generation
from distillm2_jax import sharding as shd
from distillm2_jax.generation import slots
from distillm2_jax.hf import from_pretrained
from distillm2_jax import models
from distillm2_jax.models import lora
from tests.generation.test_generate import hf_greedy, random_prompts
from tests.tiny_models import build_hf_model, hf_config

# 14 rows on 4 slots: prompts of 1 to 40 tokens (three length buckets), 1 to 30 new tokens.
LENGTHS = (40, 3, 1, 17, 9, 33, 2, 25, 5, 12, 38, 7, 4, 21)
LIMITS = (30, 1, 26, 3, 30, 2, 17, 30, 5, 29, 1, 30, 12, 8)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_cb")
    hf = build_hf_model("qwen2", d, initializer_range=0.2)
    return d, hf


def _tokens(results):
    return [(r.tokens, r.finish_reason) for r in results]


def test_greedy_with_refilled_slots_equals_static_batches_and_hf_on_8_devices(qwen2, monkeypatch):
    d, hf = qwen2
    prompts = random_prompts(seed=3, lengths=LENGTHS)
    mesh = shd.make_mesh((2, 2, 2))          # slots over data x fsdp = 4, weights over fsdp x tensor
    sharded = from_pretrained(d, dtype=jnp.float32, mesh=mesh)
    inserted = []                             # the slot of every row the sampler inserted
    real_insert = slots.insert

    def spy(params, cfg, state, ids, mask, dest, *a, **k):
        inserted.extend(int(s) for s in np.asarray(dest) if s < state.done.shape[0])
        return real_insert(params, cfg, state, ids, mask, dest, *a, **k)

    monkeypatch.setattr(slots, "insert", spy)
    kw = dict(max_new_tokens=list(LIMITS), temperature=0.0, eos_ids=(2,), batch_size=4)
    cont = generation.sample(sharded, prompts, mesh=mesh, sync_every=3, min_refill=1, **kw)
    monkeypatch.undo()
    static = generation.sample(from_pretrained(d, dtype=jnp.float32), prompts, continuous=False, **kw)
    expected = [row[:n] for row, n in zip(hf_greedy(hf, prompts, n=max(LIMITS)), LIMITS)]
    assert [r.tokens for r in cont] == expected
    assert _tokens(cont) == _tokens(static)
    assert [r.new_tokens for r in cont] == [len(t) for t in expected]
    assert all(r.finish_reason == ("stop" if t and t[-1] == 2 else "length") for r, t in zip(cont, expected))
    # every row went through a slot; every slot was refilled, one of them at least 3 times
    counts = [inserted.count(s) for s in range(4)]
    assert len(inserted) == len(prompts) and min(counts) >= 2 and max(counts) >= 4, f"slots used: {inserted}"


def test_seeded_rows_do_not_depend_on_slots_or_refill_order(qwen2):
    d, _ = qwen2
    model = from_pretrained(d, dtype=jnp.float32)
    prompts = random_prompts(seed=4, lengths=LENGTHS)
    kw = dict(max_new_tokens=list(LIMITS), temperature=1.0, top_p=0.9, seed=11, row_ids=[f"r{i}" for i in range(14)])
    static = generation.sample(model, prompts, batch_size=5, continuous=False, **kw)
    cont = generation.sample(model, prompts, batch_size=3, sync_every=2, min_refill=1, **kw)
    assert _tokens(cont) == _tokens(static)
    other = generation.sample(model, prompts, batch_size=3, **{**kw, "seed": 12})
    assert sum(a.tokens != b.tokens for a, b in zip(cont, other)) >= 10


def test_results_come_back_in_row_order_and_resume_from_any_row(qwen2):
    d, _ = qwen2
    model = from_pretrained(d, dtype=jnp.float32)
    prompts = random_prompts(seed=5, lengths=LENGTHS)
    kw = dict(max_new_tokens=list(LIMITS), temperature=1.0, seed=3, batch_size=4, sync_every=2, min_refill=1)
    rows = []
    results = []
    for r, res in generation.iter_sample(model, prompts, **kw):
        rows.extend(r)
        results.extend(res)
    assert rows == list(range(len(prompts)))
    tail = [res for _, chunk in generation.iter_sample(model, prompts, start_row=9, **kw) for res in chunk]
    assert tail == results[9:]


def test_insert_groups_hold_one_prompt_bucket_each():
    rows, buckets = [3, 4, 5, 6, 7, 8, 9], [16, 32, 16, 16, 64, 16, 32]
    assert slots.insert_groups(rows, buckets, 2) == [[3, 5], [6, 8], [4, 9], [7]]
    assert slots.insert_groups(rows, buckets, 1) == [[3], [5], [6], [8], [4], [9], [7]]


# ----------------------------------------------------------------------------- memory

def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


@pytest.mark.parametrize("with_lora", [False, True])
def test_decoding_holds_the_weights_once(with_lora, monkeypatch):
    """Live device buffers while decoding: the params, the decode state and nothing the size of
    the weights beside them (the sampler used to unstack the layers into a second copy, and
    the trainer merged LoRA into one); and the compiled decode program's temporaries hold one
    layer's weights at most, not all of them."""
    # layer weights that dwarf the decode state: a copy of them cannot hide
    model = models.from_config(hf_config("qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=4))
    params = model.params()
    if with_lora:
        params = lora.add(params, model.config, rank=4, alpha=8.0, targets=("q", "v", "up"), key=jax.random.key(1))
    layer_bytes = _bytes(params["layers"]) // model.config.num_layers
    seen = {"live": 0, "state": 0, "temp": None}
    real_decode = slots.decode

    def spy(params_, cfg, state, stops, steps, min_free, **static):
        out = real_decode(params_, cfg, state, stops, steps, min_free, **static)
        jax.block_until_ready(out)
        seen["live"] = max(seen["live"], _live_bytes())
        seen["state"] = _bytes(out)
        if seen["temp"] is None:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params_, out))
            compiled = real_decode.lower(shapes[0], cfg, shapes[1], stops, steps, min_free, **static).compile()
            seen["temp"] = compiled.memory_analysis().temp_size_in_bytes
        return out

    prompts = random_prompts(seed=6, lengths=(5, 9, 3, 7, 11, 4))
    base = _live_bytes()
    monkeypatch.setattr(slots, "decode", spy)
    generation.sample((params, model.config), prompts, max_new_tokens=6, temperature=0.0, batch_size=2,
                      sync_every=2)
    extra = seen["live"] - base - seen["state"]
    assert extra < 0.5 * _bytes(params), (extra, _bytes(params))
    assert seen["temp"] < 1.5 * layer_bytes, (seen["temp"], layer_bytes)

