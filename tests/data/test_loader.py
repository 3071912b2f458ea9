"""The grain pair loader: seeded epochs, exact resume, per-process slices, TFDS round trip."""
import numpy as np
import pytest

from distillm2_jax.data.batches import IGNORE_INDEX, PairTokenizer
from distillm2_jax.data.loader import PairLoader, epoch_seed
from distillm2_jax.data.pairs import Pair
from distillm2_jax.errors import UserError
from tests.tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

N = 24
PAIRS = [Pair([{"role": "user", "content": f"q{i} " * (1 + i % 4)}], f"teacher {i}", f"student {i} " * (1 + i % 3))
         for i in range(N)]
ARGS = dict(max_length=48, max_prompt_length=32)


def loader(tok, pairs=PAIRS, **kw):
    kw = {**ARGS, "global_batch_size": 4, "process_index": 0, "process_count": 1, **kw}
    return PairLoader(pairs, tok, **kw)


def chosen_ids(batch, b=None):
    """Identify each pair of a rows-layout batch by its chosen row."""
    ids, n = batch["input_ids"], batch["input_ids"].shape[0] // 2
    return [tuple(r) for r in ids[:n]]


def order(it):
    return [row for batch in it for row in chosen_ids(batch)]


def test_same_seed_same_order_other_epoch_other_order(tiny_tokenizer):
    a = order(loader(tiny_tokenizer, seed=3, epoch=0))
    assert a == order(loader(tiny_tokenizer, seed=3, epoch=0))
    assert len(a) == N and len(set(a)) == N  # every pair exactly once per epoch
    b = order(loader(tiny_tokenizer, seed=3, epoch=1))
    assert sorted(a) == sorted(b) and a != b
    assert order(loader(tiny_tokenizer, seed=4, epoch=0)) != a
    assert epoch_seed(1, 0) != epoch_seed(0, 1)


def test_rows_layout_pairs_rows_b_apart(tiny_tokenizer):
    batch = next(iter(loader(tiny_tokenizer, seed=0)))
    assert batch["input_ids"].shape == (8, 48)
    prompt_len = (batch["labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)
    # Row i and row i+B share the prompt (same pair).
    for i in range(4):
        n = prompt_len[i].sum()
        assert n == prompt_len[i + 4].sum()
        np.testing.assert_array_equal(batch["input_ids"][i, :n], batch["input_ids"][i + 4, :n])


def test_restored_iterator_continues_exactly(tiny_tokenizer):
    ld = loader(tiny_tokenizer, seed=7)
    it = iter(ld)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = ld.iterator(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # A loader rebuilt from scratch (new process after a restart) restores too.
    again = loader(tiny_tokenizer, seed=7).iterator()
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], expected[0]["input_ids"])


def test_orbax_grain_handler_round_trip(tiny_tokenizer, tmp_path):
    import grain
    from etils import epath

    ld = loader(tiny_tokenizer, seed=1)
    it = iter(ld)
    next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    want = next(it)
    fresh = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(ld.iterator()))
    np.testing.assert_array_equal(next(fresh)["labels"], want["labels"])


@pytest.mark.parametrize("layout", ["rows", "shared_prompt"])
def test_processes_get_disjoint_slices_of_the_global_batch(tiny_tokenizer, layout):
    single = list(loader(tiny_tokenizer, seed=5, layout=layout))
    p0 = list(loader(tiny_tokenizer, seed=5, layout=layout, process_index=0, process_count=2))
    p1 = list(loader(tiny_tokenizer, seed=5, layout=layout, process_index=1, process_count=2))
    assert len(single) == len(p0) == len(p1) == N // 4
    for g, a, b in zip(single, p0, p1):
        for k in g:
            if layout == "shared_prompt":   # every array has the pairs on axis 0
                np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
            else:  # [2B, ...]: chosen halves then rejected halves
                na, nb = a[k].shape[0] // 2, b[k].shape[0] // 2
                merged = np.concatenate([a[k][:na], b[k][:nb], a[k][na:], b[k][nb:]])
                np.testing.assert_array_equal(merged, g[k])
        if layout == "rows":
            assert not set(chosen_ids(a)) & set(chosen_ids(b))


def test_default_process_index_comes_from_jax(tiny_tokenizer):
    ld = PairLoader(PAIRS, tiny_tokenizer, global_batch_size=4, **ARGS)
    assert (ld.process_index, ld.process_count) == (0, 1)


def test_drop_remainder(tiny_tokenizer):
    pairs = PAIRS[:10]
    assert len(loader(tiny_tokenizer, pairs)) == 2
    ld = loader(tiny_tokenizer, pairs, drop_remainder=False)
    batches = list(ld)
    assert len(ld) == len(batches) == 3
    last = batches[-1]
    assert last["valid"].tolist() == [1, 1, 0, 0] * 2
    assert (last["labels"][[2, 3, 6, 7]] == IGNORE_INDEX).all()
    assert (last["attention_mask"][[2, 3, 6, 7]] == 0).all()
    assert sum(int(b["valid"].sum()) for b in batches) == 2 * 10


def test_bad_arguments(tiny_tokenizer):
    with pytest.raises(UserError, match="multiple of the process count"):
        loader(tiny_tokenizer, global_batch_size=3, process_count=2)
    with pytest.raises(UserError, match="fewer than one global batch"):
        loader(tiny_tokenizer, PAIRS[:2])
    with pytest.raises(UserError, match="single process"):
        loader(tiny_tokenizer, length_buckets=(16, 48), process_count=2)


def test_tfds_array_record_round_trip(tiny_tokenizer, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from distillm2_jax.data.tfds_io import TokenizedPairSource, export_tokenized_pairs

    tokenized = PairTokenizer(tiny_tokenizer, **ARGS).tokenize(PAIRS)
    export_tokenized_pairs(tokenized, str(tmp_path))
    with pytest.raises(UserError, match="already exists"):
        export_tokenized_pairs(tokenized, str(tmp_path))
    source = TokenizedPairSource(str(tmp_path))
    assert len(source) == N
    for i in (0, 5, N - 1):
        np.testing.assert_array_equal(source[i].prompt_ids, tokenized[i].prompt_ids)
        np.testing.assert_array_equal(source[i].chosen_ids, tokenized[i].chosen_ids)
        np.testing.assert_array_equal(source[i].rejected_ids, tokenized[i].rejected_ids)
    from_text = list(loader(tiny_tokenizer, seed=2))
    from_tfds = list(loader(tiny_tokenizer, source, seed=2))
    assert len(from_text) == len(from_tfds)
    for a, b in zip(from_text, from_tfds):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
