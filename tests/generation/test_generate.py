"""The JAX sampler end to end: HF parity, cache logits, stop handling, seeds, mesh, JSONL + restart.

Compile time dominates, so the tests share a handful of programs: greedy on tiny models
(batch 4, prompt bucket 16, 12 new tokens) and one sampling setting on a tokenizer-sized
model (batch 3, bucket 64, 10 new tokens) used by the seed, restart and CLI tests.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import generation
from distillm2_jax import sharding as shd
from distillm2_jax.cli import main
from distillm2_jax.data.batches import make_batch
from distillm2_jax.data.generations import read_generations, tokenizer_fingerprint
from distillm2_jax.data.pairs import build_pairs, read_pairs
from distillm2_jax.errors import UserError
from distillm2_jax.generation import sampler
from distillm2_jax.hf import from_pretrained
from distillm2_jax.sampling import GREEDY, generate_batch, stop_id_array
from tests.tiny_models import VOCAB, build_hf_model
from tests.tiny_tokenizer import EOS_ID, tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

N = 12                                  # new tokens in the greedy tests
LENGTHS = (11, 7, 3, 9, 14, 5)          # two batches of 4 (the second with 2 dummy rows)


def random_prompts(seed: int = 1, lengths=LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n).tolist() for n in lengths]


def left_pad(prompts, total):
    ids = np.zeros((len(prompts), total), np.int32)
    mask = np.zeros((len(prompts), total), bool)
    for i, p in enumerate(prompts):
        ids[i, total - len(p):] = p
        mask[i, total - len(p):] = True
    return ids, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, HF torch model, our Decoder); built once per module."""
    built = {}

    def get(family):
        if family not in built:
            d = tmp_path_factory.mktemp(family)
            hf = build_hf_model(family, d, initializer_range=0.2)
            built[family] = (d, hf, from_pretrained(d, dtype=jnp.float32))
        return built[family]

    return get


def hf_greedy(hf, prompts, n=N, eos=2):
    """HF generate (greedy, left padding); each row cut after its first EOS (HF pads after it)."""
    import torch

    ids, mask = left_pad(prompts, max(len(p) for p in prompts))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: OpenMP threads only spin on a busy 2-core machine
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=eos)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for row in out[:, ids.shape[1]:].numpy().tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def greedy(model, prompts, eos_ids=(2,), **kw):
    return generation.sample(model, prompts, max_new_tokens=N, temperature=0.0, eos_ids=eos_ids,
                           batch_size=4, **kw)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_greedy_matches_hf_generate(tiny, family):
    """Left-padded prompts of different lengths, a partial last batch, several sync chunks."""
    _, hf, model = tiny(family)
    prompts = random_prompts()
    results = greedy(model, prompts, sync_every=5)
    assert [r.tokens for r in results] == hf_greedy(hf, prompts)
    for r, p in zip(results, prompts):
        assert r.prompt_tokens == len(p) and r.new_tokens == len(r.tokens)
        if r.finish_reason == "stop":
            assert r.tokens[-1] == 2 and 2 not in r.tokens[:-1]
        else:
            assert r.finish_reason == "length" and r.new_tokens == N and 2 not in r.tokens


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_decode_logits_equal_full_forward_at_every_step(tiny, family):
    """The sampler's own step logits (record_logits) equal a full forward over prompt + output."""
    _, hf, model = tiny(family)
    params, cfg = model.params(), model.config
    prompts = random_prompts(seed=2, lengths=(11, 7, 3, 9))
    P = 16
    ids, mask = left_pad(prompts, P)
    out = generate_batch(params, cfg, ids, mask, jax.random.key(0), max_new_tokens=N,
                         sampling=GREEDY, stop_ids=[2], record_logits=True)
    tokens, num_new, rec = np.asarray(out.tokens), np.asarray(out.num_new), np.asarray(out.logits)
    full_ids = np.concatenate([ids, tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1], bool)], axis=1)
    full = np.asarray(model(full_ids, attention_mask=full_mask))[:, P - 1:]   # predicts token t
    for b in range(len(prompts)):
        n = int(num_new[b])
        np.testing.assert_allclose(rec[b, :n], full[b, :n], atol=3e-5, rtol=1e-5)
        assert (tokens[b, n:] == 0).all()   # pad after the row's end
    assert [tokens[b, :num_new[b]].tolist() for b in range(len(prompts))] == hf_greedy(hf, prompts)


# ----------------------------------------------------------------------------- stops

def test_stop_ids_end_rows_independently_and_max_new_tokens_holds(tiny):
    _, _, model = tiny("qwen2")
    prompts = random_prompts()
    free = greedy(model, prompts, eos_ids=())
    assert all(r.finish_reason == "length" and r.new_tokens == N for r in free)
    first = free[0].tokens
    j = next(j for j in range(2, N) if first[j] not in first[:j])  # row 0 first emits it at j
    stops = (first[j], 2)
    got = greedy(model, prompts, eos_ids=stops)
    for r, f in zip(got, free):
        ends = [i for i, t in enumerate(f.tokens) if t in stops]
        if ends:
            assert (r.tokens, r.finish_reason) == (f.tokens[: ends[0] + 1], "stop")
        else:
            assert (r.tokens, r.finish_reason) == (f.tokens, "length")
    assert got[0].finish_reason == "stop" and got[0].new_tokens == j + 1
    assert any(r.finish_reason == "length" for r in got), "every row stopped: pick another stop id"
    # low level (the same compiled program): slots after a row's stop hold pad_id
    ids, mask = left_pad(prompts[:4], 16)
    out = generate_batch(model.params(), model.config, ids, mask, jax.random.key(0), max_new_tokens=N,
                         stop_ids=stops, pad_id=0)
    toks, num_new = np.asarray(out.tokens), np.asarray(out.num_new)
    assert num_new[0] == j + 1 and (toks[0, j + 1:] == 0).all()
    assert np.asarray(out.stopped)[0]


# ----------------------------------------------------------------------------- mesh

def test_sharded_batch_on_8_devices_gives_the_same_tokens(tiny):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    d, _, model = tiny("qwen2")
    mesh = shd.make_mesh((2, 2, 2))   # batch over data x fsdp = 4; weights over fsdp and tensor
    sharded = from_pretrained(d, dtype=jnp.float32, mesh=mesh)
    prompts = random_prompts()
    ref = greedy(model, prompts)
    got = greedy(sharded, prompts, mesh=mesh)
    assert [(r.tokens, r.finish_reason) for r in got] == [(r.tokens, r.finish_reason) for r in ref]
    # the same compiled program, called directly: its outputs are split over the batch axes
    ids, mask = left_pad(prompts[:4], 16)
    out = generate_batch(sharded.params(), sharded.config, sampler._put(ids, ("batch", "length"), mesh),
                         sampler._put(mask, ("batch", "length"), mesh),
                         sampler._put(jax.random.key(0), (), mesh), max_new_tokens=N,
                         stop_ids=sampler._put(stop_id_array([2]), (), mesh),
                         row_ids=sampler._put(np.arange(4, dtype=np.uint32), ("batch",), mesh), mesh=mesh)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    assert len(out.tokens.addressable_shards) == 8
    assert np.asarray(out.tokens)[:, 0].tolist() == [r.tokens[0] for r in ref[:4]]


# ----------------------------------------------------------------------------- sampling + files

PROMPTS = ["hello world", "write a short poem about the sea", "what is two plus three",
           "explain why sky is blue", "good bad", "Sure! Here is an answer",
           "the quick brown fox jumps over a lazy dog and the lazy dog jumps over the quick brown fox"]
SAMPLING = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=0, max_prompt_length=48,
                seed=7, batch_size=3)


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):  # noqa: F811
    """A tiny qwen2 with the tiny tokenizer's vocabulary, a prompt file, and its reference output."""
    root = tmp_path_factory.mktemp("lm400")
    d = root / "model"
    build_hf_model("qwen2", d, vocab_size=len(tiny_tokenizer), initializer_range=0.2)
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    model = from_pretrained(d, dtype=jnp.float32)
    ref = root / "reference.jsonl"
    generation.generate_file(model, str(src), ref, tokenizer=tiny_tokenizer, model_name=str(d),
                           progress=False, **SAMPLING)
    return d, model, src, ref


def test_seeds_reproduce_and_differ(lm, tiny_tokenizer):  # noqa: F811
    from distillm2_jax.data.prompts import load_templated_prompts

    _, model, src, _ = lm
    tps = load_templated_prompts(str(src), tiny_tokenizer, max_prompt_length=48)
    ids, rids = [t.input_ids for t in tps], [t.id for t in tps]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, eos_ids=[EOS_ID], batch_size=3)
    a = generation.sample(model, ids, seed=7, row_ids=rids, **kw)
    b = generation.sample(model, ids, seed=7, row_ids=rids, **kw)
    c = generation.sample(model, ids, seed=8, row_ids=rids, **kw)
    assert a == b
    assert sum(x.tokens != y.tokens for x, y in zip(a, c)) >= len(a) - 1
    # a row's sample depends on (seed, row id, prompt), not on its batch or position
    order = [6, 5, 4, 3, 2, 1, 0]
    d = generation.sample(model, [ids[i] for i in order], seed=7, row_ids=[rids[i] for i in order], **kw)
    assert [d[order.index(i)].tokens for i in range(len(ids))] == [x.tokens for x in a]


def test_generate_file_records(lm, tiny_tokenizer):  # noqa: F811
    d, _, src, ref = lm
    recs = read_generations(str(ref))
    assert [r.id for r in recs] == [str(i) for i in range(len(PROMPTS))]
    assert [r.prompt for r in recs] == PROMPTS
    raw = [json.loads(line) for line in ref.read_text().splitlines()]
    for r in raw:
        assert r["finish_reason"] in ("stop", "length") and r["model"] == str(d)
        assert 0 < r["prompt_tokens"] <= 48 and 0 < r["response_tokens"] <= 10
        assert r["finish_reason"] == "stop" or r["response_tokens"] == 10
        # the sampled ids without the stop token, and the text is their decode
        assert len(r["response_ids"]) == r["response_tokens"] - (r["finish_reason"] == "stop")
        assert EOS_ID not in r["response_ids"]
        assert tiny_tokenizer.decode(r["response_ids"], skip_special_tokens=True) == r["response"]
        assert r["tokenizer"] == tokenizer_fingerprint(tiny_tokenizer)
    assert [g.response_ids for g in recs] == [r["response_ids"] for r in raw]
    assert raw[-1]["prompt_tokens"] == 48   # the long prompt kept its last 48 tokens
    meta = json.loads(generation.meta_path(ref).read_text())
    assert meta["args"]["seed"] == 7 and meta["args"]["num_prompts"] == len(PROMPTS)


def test_sampled_non_canonical_ids_stay_as_sampled_in_training_labels(
        lm, tiny_tokenizer, tmp_path):  # noqa: F811
    """The random model samples token sequences that re-encoding their text would change."""
    _, _, _, ref = lm
    gens = read_generations(str(ref))
    canonical = [tiny_tokenizer(g.response, add_special_tokens=False)["input_ids"] for g in gens]
    assert sum(c != g.response_ids for c, g in zip(canonical, gens)) >= 2, \
        "the sampled rows are canonical encodings: this test would prove nothing"
    build_pairs(str(ref), str(ref), str(tmp_path / "pairs.jsonl"))
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    batch = make_batch(pairs, tiny_tokenizer, max_length=64, max_prompt_length=48, layout="shared_prompt")
    for i, g in enumerate(gens):
        for half in (0, 1):
            labels = batch["labels"][i, half]
            assert labels[labels != -100].tolist() == g.response_ids + [EOS_ID]


def test_restart_after_interruption_gives_the_uninterrupted_rows(lm, tiny_tokenizer, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    d, model, src, ref = lm
    kw = dict(tokenizer=tiny_tokenizer, model_name=str(d), progress=False, **SAMPLING)
    lines = ref.read_text().splitlines(keepends=True)
    # (1) killed while writing: 4 complete rows (mid-batch) and half a line
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:4]) + lines[4][:25])
    generation.meta_path(part).write_text(generation.meta_path(ref).read_text())
    s = generation.generate_file(model, str(src), part, **kw)
    assert (s.rows_existing, s.rows_written) == (4, 3)
    assert part.read_bytes() == ref.read_bytes()
    # nothing left to do on a complete file
    s = generation.generate_file(model, str(src), part, **kw)
    assert s.rows_written == 0 and part.read_bytes() == ref.read_bytes()

    # (2) an exception after the first rows were written, then a rerun
    class Interrupted(Exception):
        pass

    calls = {"n": 0}
    real_decode = tiny_tokenizer.batch_decode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupted
        return real_decode(*a, **k)

    crash = tmp_path / "crash.jsonl"
    monkeypatch.setattr(tiny_tokenizer, "batch_decode", flaky)
    with pytest.raises(Interrupted):
        generation.generate_file(model, str(src), crash, **kw)
    monkeypatch.undo()
    written = crash.read_text()
    assert any(written == "".join(lines[:k]) for k in range(1, len(lines))), written
    generation.generate_file(model, str(src), crash, **kw)
    assert crash.read_bytes() == ref.read_bytes()

    # (3) other arguments: refused, unless overwrite
    with pytest.raises(UserError, match=r"seed: 7 -> 8.*--overwrite"):
        generation.generate_file(model, str(src), crash, **{**kw, "seed": 8})
    s = generation.generate_file(model, str(src), crash, overwrite=True, **{**kw, "seed": 8})
    assert s.rows_written == len(PROMPTS) and crash.read_bytes() != ref.read_bytes()
    # (4) a file that was not made by generate
    alien = tmp_path / "alien.jsonl"
    alien.write_text(lines[0])
    with pytest.raises(UserError, match="meta.json"):
        generation.generate_file(model, str(src), alien, **kw)
    # (5) a damaged file or sidecar: a one-line error naming it, never a traceback
    meta = generation.meta_path(ref).read_text()
    for name, body, sidecar in (("deep", b"[" * 100_000 + b"\n", meta),
                                ("bytes", lines[0].encode() + b"\xff\xfe\n", meta),
                                ("sidecar", lines[0].encode(), "[" * 100_000)):
        bad = tmp_path / f"{name}.jsonl"
        bad.write_bytes(body)
        generation.meta_path(bad).write_text(sidecar)
        with pytest.raises(UserError, match=str(bad.name)):
            generation.generate_file(model, str(src), bad, **kw)


def test_cli_generate_writes_the_same_file_and_refuses_other_arguments(
        lm, tiny_tokenizer_dir, tmp_path, capsys):  # noqa: F811
    d, _, src, ref = lm
    out = tmp_path / "cli.jsonl"
    argv = ["generate", "--model", str(d), "--tokenizer", str(tiny_tokenizer_dir), "--prompts", str(src),
            "--out", str(out), "--temperature", "1.0", "--top-p", "0.95", "--max-new-tokens", "10",
            "--max-prompt-length", "48", "--seed", "7", "--batch-size", "3", "--dtype", "float32",
            "--mesh", "1,1,1", "--no-progress"]
    assert main(argv) == 0
    assert out.read_bytes() == ref.read_bytes()
    assert "wrote 7 of 7 rows" in capsys.readouterr().err
    assert main(argv[:-1] + ["--seed", "9", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distillm2 generate: error:") and "--overwrite" in err and "\n" not in err
