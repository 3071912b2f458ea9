"""Training batches: [chosen; rejected] rows, labels exactly on response + end-of-turn, truncation."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillm2_jax.data import chat
from distillm2_jax.data.batches import (IGNORE_INDEX, TokenizedPair, collate_fn,
                                        collate_shared_prompts, make_batch, truncate_pair)
from distillm2_jax.data.pairs import Pair
from distillm2_jax.errors import UserError
from tests.tiny_tokenizer import EOS_ID, PAD_ID, tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

PAIRS = [
    Pair([{"role": "user", "content": f"question number {i}?"}],
         f"The teacher answers {i}.", "student " * (i + 1), f"p{i}")
    for i in range(3)
]


def row_parts(tok, pair, response):
    prompt = chat.encode_prompt(tok, pair.messages).input_ids.tolist()
    return prompt, chat.encode_text(tok, response) + [EOS_ID]


def test_rows_are_chosen_then_rejected_with_exact_labels(tiny_tokenizer):
    b = make_batch(PAIRS, tiny_tokenizer, max_length=96, max_prompt_length=64)
    assert set(b) == {"input_ids", "attention_mask", "labels", "valid"}
    assert b["input_ids"].shape == (6, 96) and b["input_ids"].dtype == np.int32
    assert b["valid"].tolist() == [1] * 6
    for row in range(6):
        pair = PAIRS[row % 3]
        response = pair.chosen if row < 3 else pair.rejected
        prompt, resp = row_parts(tiny_tokenizer, pair, response)
        lp, lr = len(prompt), len(resp)
        assert b["input_ids"][row, :lp].tolist() == prompt
        assert b["input_ids"][row, lp:lp + lr].tolist() == resp
        assert (b["input_ids"][row, lp + lr:] == PAD_ID).all()
        assert b["attention_mask"][row].tolist() == [1] * (lp + lr) + [0] * (96 - lp - lr)
        labels = b["labels"][row]
        assert (labels[:lp] == IGNORE_INDEX).all() and (labels[lp + lr:] == IGNORE_INDEX).all()
        assert labels[lp:lp + lr].tolist() == resp and resp[-1] == EOS_ID
        assert tiny_tokenizer.decode(labels[lp:lp + lr - 1]) == response


def test_separate_encoding_matches_the_full_template(tiny_tokenizer):
    b = make_batch(PAIRS[:1], tiny_tokenizer, max_length=96, max_prompt_length=64)
    full = tiny_tokenizer.apply_chat_template(
        PAIRS[0].messages + [{"role": "assistant", "content": PAIRS[0].chosen}], tokenize=False)
    full_ids = tiny_tokenizer(full, add_special_tokens=False)["input_ids"]
    n = int(b["attention_mask"][0].sum())
    assert b["input_ids"][0, :n].tolist() == full_ids[:n]
    assert full_ids[n:] == tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_long_prompt_keeps_its_end_and_long_response_loses_eos(tiny_tokenizer):
    pair = Pair([{"role": "user", "content": "blah " * 60 + "final question?"}], "ok " * 80, "no")
    b = make_batch([pair], tiny_tokenizer, max_length=64, max_prompt_length=24)
    prompt_full = chat.encode_prompt(tiny_tokenizer, pair.messages).input_ids.tolist()
    assert b["input_ids"][0, :24].tolist() == prompt_full[-24:]
    assert b["input_ids"][1, :24].tolist() == prompt_full[-24:]
    # Chosen: cut at max_length, no end-of-turn (the response was not complete).
    assert b["attention_mask"][0].sum() == 64
    assert (b["labels"][0, 24:] != IGNORE_INDEX).all() and b["labels"][0, -1] != EOS_ID
    assert b["labels"][0, 24:].tolist() == chat.encode_text(tiny_tokenizer, pair.chosen)[:40]
    # Rejected: short, complete, ends with end-of-turn.
    n = int(b["attention_mask"][1].sum())
    assert b["labels"][1, n - 1] == EOS_ID


def test_buckets(tiny_tokenizer):
    rows = make_batch(PAIRS, tiny_tokenizer, max_length=256, max_prompt_length=64,
                      length_buckets=(16, 64, 128))
    assert rows["input_ids"].shape == (6, 64)


def test_shared_prompt_layout_holds_the_rows_tokens_once_per_prompt(tiny_tokenizer):
    """Each prompt once (left-padded), both responses right-padded, labels = response tokens."""
    rows = make_batch(PAIRS, tiny_tokenizer, max_length=96, max_prompt_length=64)
    b = make_batch(PAIRS, tiny_tokenizer, max_length=96, max_prompt_length=64, layout="shared_prompt")
    assert b["prompt_ids"].shape == (3, 64) and b["response_ids"].shape == (3, 2, 32)
    assert b["labels"].shape == b["response_mask"].shape == (3, 2, 32) and b["valid"].tolist() == [1] * 3
    for row in range(6):
        half, i = divmod(row, 3)
        n = int(rows["attention_mask"][row].sum())
        lp = int(b["prompt_mask"][i].sum())
        lr = int(b["response_mask"][i, half].sum())
        assert lp + lr == n
        assert b["prompt_mask"][i].tolist() == [0] * (64 - lp) + [1] * lp   # left-padded
        assert b["prompt_ids"][i, 64 - lp:].tolist() == rows["input_ids"][row, :lp].tolist()
        assert (b["prompt_ids"][i, :64 - lp] == PAD_ID).all()
        assert b["response_ids"][i, half, :lr].tolist() == rows["input_ids"][row, lp:n].tolist()
        assert b["labels"][i, half].tolist() == rows["labels"][row, lp:lp + 32].tolist()


def test_shared_prompt_layout_caps_responses_and_buckets_each_part(tiny_tokenizer):
    pair = Pair([{"role": "user", "content": "q?"}], "ok " * 80, "no")
    rows = make_batch([pair], tiny_tokenizer, max_length=128, max_prompt_length=64)
    b = make_batch([pair], tiny_tokenizer, max_length=128, max_prompt_length=64, layout="shared_prompt")
    lp = int(b["prompt_mask"][0].sum())
    assert lp < 64 and int(rows["attention_mask"][0].sum()) == 128   # rows: 128 - lp response tokens
    assert int(b["response_mask"][0, 0].sum()) == 64                  # shared: max_length - max_prompt_length
    assert b["labels"][0, 0].tolist() == rows["labels"][0, lp:lp + 64].tolist()
    bucketed = make_batch([pair], tiny_tokenizer, max_length=128, max_prompt_length=64,
                          layout="shared_prompt", length_buckets=(8, 16, 32, 48))
    assert bucketed["prompt_ids"].shape[1] == min(x for x in (8, 16, 32, 48, 64) if x >= lp)
    assert bucketed["response_ids"].shape[2] == 64    # no bucket holds 64 tokens: the cap
    np.testing.assert_array_equal(bucketed["labels"], b["labels"])


def test_shared_prompt_layout_masks_the_first_label_after_an_empty_prompt():
    pairs = [TokenizedPair(np.zeros(0, np.int32), np.array([5, 6, 7], np.int32), np.array([8], np.int32)),
             TokenizedPair(np.array([3], np.int32), np.array([9], np.int32), np.zeros(0, np.int32))]
    b = collate_shared_prompts(pairs, max_prompt_length=2, max_response_length=3, pad_id=0)
    assert b["labels"][0].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]   # nothing predicts 5 or 8
    assert b["labels"][1].tolist() == [[9, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 3]
    assert b["prompt_mask"].tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="max_response_length"):
        collate_shared_prompts(pairs, max_prompt_length=2, max_response_length=2, pad_id=0)


def test_length_limits_are_checked(tiny_tokenizer):
    with pytest.raises(UserError, match="must be smaller"):
        make_batch(PAIRS, tiny_tokenizer, max_length=64, max_prompt_length=64)
    with pytest.raises(UserError, match="layout"):
        collate_fn("columns", max_length=8, max_prompt_length=4, pad_id=0)


@settings(max_examples=60, deadline=None)
@given(lp=st.integers(1, 40), lc=st.integers(1, 40), lr=st.integers(1, 40),
       max_prompt=st.integers(1, 20), extra=st.integers(1, 30), bos=st.booleans())
def test_truncation_properties(lp, lc, lr, max_prompt, extra, bos):
    max_length = max_prompt + extra
    prompt = [9] + list(range(100, 100 + lp - 1)) if bos else list(range(100, 100 + lp))
    chosen, rejected = list(range(500, 500 + lc)), list(range(800, 800 + lr))
    tp = truncate_pair(prompt, chosen, rejected, max_length=max_length,
                       max_prompt_length=max_prompt, bos_id=9 if bos else None)
    p = tp.prompt_ids.tolist()
    assert len(p) == min(lp, max_prompt)
    if bos and lp > max_prompt > 1:
        assert p[0] == 9 and p[1:] == prompt[len(prompt) - (max_prompt - 1):]
    else:
        assert p == prompt[len(prompt) - len(p):]
    for full, got in ((chosen, tp.chosen_ids.tolist()), (rejected, tp.rejected_ids.tolist())):
        assert got == full[:max_length - len(p)]  # responses keep their START
        assert len(p) + len(got) <= max_length
    capped = truncate_pair(prompt, chosen, rejected, max_length=max_length, max_prompt_length=max_prompt,
                           bos_id=9 if bos else None, max_response_length=extra)
    assert capped.prompt_ids.tolist() == p
    assert capped.chosen_ids.tolist() == chosen[:min(extra, max_length - len(p))]
