"""Tokenised training batches: pairs -> [chosen rows; rejected rows] with response labels.

Layout of a batch of B pairs (docs/data.md, "Batch layout"), all int32, right-padded to T:

    input_ids       [2B, T]  rows 0..B-1 = prompt+chosen of pairs 0..B-1 (teacher output, TGO),
                             rows B..2B-1 = prompt+rejected of the same pairs (student output, SGO)
    attention_mask  [2B, T]  1 on prompt and response tokens, 0 on padding
    labels          [2B, T]  input_ids on response tokens (incl. the end-of-turn token), -100 on
                             prompt and padding (HF causal convention: aligned with input_ids,
                             the loss shifts)
    valid           [2B]     1 for real pairs, 0 for filler pairs (only when a loader pads the
                             last batch, drop_remainder=False)

With layout="stacked" every array gets shape [2, B, ...] instead (index 0 = chosen, 1 =
rejected) so that a global batch can be assembled from per-host pieces along axis 1.

With layout="shared_prompt" (the trainer's; `collate_shared_prompts`) a pair's prompt is stored
once and both responses continue it, so the models run each prompt once per pair:

    prompt_ids, prompt_mask        [B, P]     LEFT-padded prompts, P = max_prompt_length
    response_ids, response_mask    [2, B, R]  right-padded responses (0 = chosen, 1 = rejected),
                                              R = max_length - max_prompt_length
    labels                         [2, B, R]  response_ids on response tokens, -100 on padding
                                              (and on the first token after an empty prompt,
                                              which nothing predicts)
    valid                          [B]

Here a response keeps at most R tokens whatever its prompt's length, so that R is static.

Truncation: the prompt keeps its END to at most max_prompt_length tokens (a leading BOS stays);
the response then gets the remaining max_length - len(prompt) tokens and is cut at its end.
The end-of-turn token is appended before cutting, so it survives only when the whole response
fits: a cut response does not teach the model to stop there.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import numpy as np

from distillm2_jax.data.chat import (encode_prompts, encode_texts, end_of_turn_id,
                                     pad_token_id, truncate_keep_end)
from distillm2_jax.data.pairs import Pair
from distillm2_jax.errors import UserError

IGNORE_INDEX = -100
ROW_LAYOUTS = ("rows", "stacked")          # collate_pairs: [prompt | response] rows
LAYOUTS = ROW_LAYOUTS + ("shared_prompt",)  # collate_shared_prompts: each prompt stored once


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair, already truncated: prompt, and each response incl. end-of-turn."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    valid: bool = True


EMPTY_PAIR = TokenizedPair(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                           valid=False)


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Both limits positive and the prompt limit below the total (room for a response)."""
    if max_length <= 0 or max_prompt_length <= 0:
        raise UserError(f"max_length ({max_length}) and max_prompt_length ({max_prompt_length}) "
                        "must be positive")
    if max_prompt_length >= max_length:
        raise UserError(f"max_prompt_length ({max_prompt_length}) must be smaller than "
                        f"max_length ({max_length})")


def truncate_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int],
                  rejected_ids: Sequence[int], *, max_length: int, max_prompt_length: int,
                  bos_id: int | None = None, max_response_length: int | None = None) -> TokenizedPair:
    """Apply the truncation rules (module docstring) to already-encoded ids; responses keep at
    most `max_response_length` tokens when it is given."""
    prompt = truncate_keep_end(prompt_ids, max_prompt_length, bos_id)
    budget = max_length - len(prompt)
    if max_response_length is not None:
        budget = min(budget, max_response_length)
    return TokenizedPair(np.asarray(prompt, np.int32),
                         np.asarray(list(chosen_ids)[:budget], np.int32),
                         np.asarray(list(rejected_ids)[:budget], np.int32))


class PairTokenizer:
    """Callable pair -> TokenizedPair with the tokenizer's special ids looked up once.

    Picklable (grain may run it in worker threads or processes).
    """

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int,
                 plain_fallback: bool = False, eot_id: int | None = None,
                 max_response_length: int | None = None):
        check_lengths(max_length, max_prompt_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.plain_fallback = plain_fallback
        self.eot_id = end_of_turn_id(tokenizer) if eot_id is None else int(eot_id)
        self.pad_id = pad_token_id(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)

    def tokenize(self, pairs: Sequence[Pair]) -> list[TokenizedPair]:
        """Tokenise many pairs with batched tokenizer calls."""
        prompts = encode_prompts(self.tokenizer, [p.messages for p in pairs],
                                 plain_fallback=self.plain_fallback,
                                 wheres=[p.where for p in pairs])
        chosen = encode_texts(self.tokenizer, [p.chosen for p in pairs])
        rejected = encode_texts(self.tokenizer, [p.rejected for p in pairs])
        return [
            truncate_pair(pr.input_ids.tolist(), c + [self.eot_id], r + [self.eot_id],
                          max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                          bos_id=self.bos_id, max_response_length=self.max_response_length)
            for pr, c, r in zip(prompts, chosen, rejected)
        ]

    def __call__(self, pair: Pair) -> TokenizedPair:
        return self.tokenize([pair])[0]

    def retruncate(self, tp: TokenizedPair) -> TokenizedPair:
        """Re-apply this tokenizer's limits to pre-tokenised ids (e.g. from a TFDS export)."""
        return truncate_pair(tp.prompt_ids, tp.chosen_ids, tp.rejected_ids,
                             max_length=self.max_length,
                             max_prompt_length=self.max_prompt_length, bos_id=self.bos_id,
                             max_response_length=self.max_response_length)


def _bucket_length(longest: int, max_length: int, buckets: Sequence[int] | None) -> int:
    if not buckets:
        return max_length
    for b in sorted(buckets):
        if b >= longest:
            return min(b, max_length)
    return max_length


def collate_pairs(pairs: Sequence[TokenizedPair], *, max_length: int, pad_id: int,
                  length_buckets: Sequence[int] | None = None,
                  layout: str = "rows") -> dict[str, np.ndarray]:
    """Stack B tokenised pairs into the [chosen; rejected] batch arrays (module docstring).

    T is `max_length`, or with `length_buckets` the smallest bucket holding the longest row
    (capped at max_length) - fewer padded tokens, but one compiled shape per bucket.
    """
    if layout not in ROW_LAYOUTS:
        raise UserError(f"layout must be one of {ROW_LAYOUTS} (shared_prompt: "
                        f"collate_shared_prompts), got {layout!r}")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids)
                                                           for p in pairs]
    longest = max((len(a) + len(b) for a, b in rows), default=0)
    if longest > max_length:
        raise ValueError(f"a row of {longest} tokens exceeds max_length {max_length}")
    t = _bucket_length(longest, max_length, length_buckets)
    n = len(rows)
    input_ids = np.full((n, t), pad_id, np.int32)
    attention = np.zeros((n, t), np.int32)
    labels = np.full((n, t), IGNORE_INDEX, np.int32)
    for i, (prompt, response) in enumerate(rows):
        lp, lr = len(prompt), len(response)
        input_ids[i, :lp] = prompt
        input_ids[i, lp:lp + lr] = response
        attention[i, :lp + lr] = 1
        labels[i, lp:lp + lr] = response
    valid = np.asarray([p.valid for p in pairs] * 2, np.int32)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "valid": valid}
    if layout == "stacked":
        batch = {k: v.reshape((2, len(pairs)) + v.shape[1:]) for k, v in batch.items()}
    return batch


def collate_shared_prompts(pairs: Sequence[TokenizedPair], *, max_prompt_length: int,
                           max_response_length: int, pad_id: int,
                           length_buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Stack B tokenised pairs into the shared-prompt arrays (module docstring).

    P is `max_prompt_length` and R `max_response_length`, or with `length_buckets` the smallest
    buckets holding the longest prompt and the longest response (capped at those limits).
    """
    longest_prompt = max((len(p.prompt_ids) for p in pairs), default=0)
    longest_response = max((max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=0)
    if longest_prompt > max_prompt_length or longest_response > max_response_length:
        raise ValueError(f"a prompt of {longest_prompt} or a response of {longest_response} tokens "
                         f"exceeds max_prompt_length {max_prompt_length} or max_response_length "
                         f"{max_response_length}")
    p_len = _bucket_length(longest_prompt, max_prompt_length, length_buckets)
    r_len = _bucket_length(longest_response, max_response_length, length_buckets)
    b = len(pairs)
    prompt_ids = np.full((b, p_len), pad_id, np.int32)
    prompt_mask = np.zeros((b, p_len), np.int32)
    response_ids = np.full((2, b, r_len), pad_id, np.int32)
    response_mask = np.zeros((2, b, r_len), np.int32)
    labels = np.full((2, b, r_len), IGNORE_INDEX, np.int32)
    for i, p in enumerate(pairs):
        lp = len(p.prompt_ids)
        if lp:
            prompt_ids[i, p_len - lp:] = p.prompt_ids
            prompt_mask[i, p_len - lp:] = 1
        for half, response in enumerate((p.chosen_ids, p.rejected_ids)):
            lr = len(response)
            response_ids[half, i, :lr] = response
            response_mask[half, i, :lr] = 1
            labels[half, i, :lr] = response
            if not lp and lr:
                labels[half, i, 0] = IGNORE_INDEX   # nothing precedes it to predict it
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
            "response_mask": response_mask, "labels": labels,
            "valid": np.asarray([p.valid for p in pairs], np.int32)}


def max_response_length(layout: str, max_length: int, max_prompt_length: int) -> int | None:
    """The response cap a layout imposes: R = max_length - max_prompt_length for
    "shared_prompt" (R is static there), None for the row layouts."""
    return max_length - max_prompt_length if layout == "shared_prompt" else None


def collate_fn(layout: str, *, max_length: int, max_prompt_length: int, pad_id: int,
               length_buckets: Sequence[int] | None = None):
    """`pairs -> batch dict` for a layout: `collate_shared_prompts` or `collate_pairs`."""
    if layout == "shared_prompt":
        return partial(collate_shared_prompts, max_prompt_length=max_prompt_length,
                       max_response_length=max_response_length(layout, max_length, max_prompt_length),
                       pad_id=pad_id, length_buckets=length_buckets)
    return partial(collate_pairs, max_length=max_length, pad_id=pad_id,
                   length_buckets=length_buckets, layout=layout)


def make_batch(pairs: Sequence[Pair], tokenizer, *, max_length: int, max_prompt_length: int,
               length_buckets: Sequence[int] | None = None, layout: str = "rows",
               plain_fallback: bool = False) -> dict[str, np.ndarray]:
    """Tokenise and collate B pairs in one call (tests, evaluation, small runs)."""
    tok = PairTokenizer(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                        plain_fallback=plain_fallback,
                        max_response_length=max_response_length(layout, max_length, max_prompt_length))
    collate = collate_fn(layout, max_length=max_length, max_prompt_length=max_prompt_length,
                         pad_id=tok.pad_id, length_buckets=length_buckets)
    return collate(tok.tokenize(pairs))
