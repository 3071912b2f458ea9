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

With layout="shared_prompt" (the trainer's; `collate_shared_prompts`) a pair's prompt is stored
once and both responses continue it, so the models run each prompt once per pair:

    prompt_ids, prompt_mask        [B, P]     LEFT-padded prompts, P = max_prompt_length
    response_ids, response_mask    [B, 2, R]  right-padded responses, pair-major (0 = chosen,
                                              1 = rejected), R = max_length - max_prompt_length
    labels                         [B, 2, R]  response_ids on response tokens, -100 on padding
                                              (and on the first token after an empty prompt,
                                              which nothing predicts)
    valid                          [B]

Here a response keeps at most R tokens whatever its prompt's length, so that R is static.
Every array has the pairs on axis 0, so a global batch is the per-process pieces concatenated
along axis 0 and a pair never spans devices; `train.batch` takes it from there to the loss.

Truncation: the prompt keeps its END to at most max_prompt_length tokens (a leading BOS stays);
the response then gets the remaining max_length - len(prompt) tokens and is cut at its end.
The end-of-turn token is appended before cutting, so it survives only when the whole response
fits: a cut response does not teach the model to stop there.

Response tokens: a side's stored token ids (`Pair.chosen_ids` / `rejected_ids`, the sampled ids)
when they come from this tokenizer (their fingerprint is `tokenizer_fingerprint(tokenizer)`),
else `encode(text)`. Re-encoding would silently replace a sampled sequence that is not the
tokenizer's own encoding of its text (common with BPE and temperature sampling) by another one.
Stored ids must decode (special tokens skipped) to the side's text, else `UserError` naming the
pair's file and line; ids of another tokenizer are not trusted and the text is encoded.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import numpy as np

from distillm2_jax.data.chat import (encode_prompts, encode_texts, end_of_turn_id,
                                     pad_token_id, truncate_keep_end)
from distillm2_jax.data.generations import tokenizer_fingerprint
from distillm2_jax.data.pairs import Pair
from distillm2_jax.data.tokenized import TokenizedPair
from distillm2_jax.errors import UserError

IGNORE_INDEX = -100
LAYOUTS = ("rows", "shared_prompt")  # collate_pairs: [prompt | response] rows (evaluation);
                                     # collate_shared_prompts: each prompt once (training)
SIDES = ("chosen", "rejected")


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


@dataclasses.dataclass
class IdsUsage:
    """Where the responses of some pairs get their tokens (one count per pair side)."""

    ids: int = 0               # the stored token ids
    other_tokenizer: int = 0   # stored ids of another tokenizer: the text is encoded instead
    text: int = 0              # no stored ids: the text is encoded

    def describe(self) -> str:
        return (f"{self.ids} responses from their sampled token ids, {self.text} text-only and "
                f"{self.other_tokenizer} with ids of another tokenizer tokenised from their text")


def stored_ids(pair: Pair, side: str, fingerprint: str | None) -> list[int] | None:
    """A side's stored ids if they were made with the tokenizer of `fingerprint`, else None."""
    ids = getattr(pair, f"{side}_ids")
    if ids is None or fingerprint is None or getattr(pair, f"{side}_tokenizer") != fingerprint:
        return None
    return list(ids)


def _show(text: str, at: int) -> str:
    return repr(text[max(0, at - 20):at + 20])


def _check_ids_match_text(tokenizer, items: Sequence[tuple[Pair, str, list[int]]],
                          eot_id: int) -> None:
    """Every (pair, side, ids): ids in the vocabulary, without end-of-turn, decoding to the text."""
    if not items:
        return
    vocab = len(tokenizer)
    for pair, side, ids in items:
        where = pair.where or "pair"
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise UserError(f"{where}: field `{side}_ids`: token id {bad[0]} is outside the "
                            f"tokenizer's {vocab} tokens")
        if ids and ids[-1] == eot_id:
            raise UserError(f"{where}: field `{side}_ids` ends with the end-of-turn token {eot_id}; "
                            f"stored ids leave it out (training appends it)")
    texts = tokenizer.batch_decode([ids for _, _, ids in items], skip_special_tokens=True)
    for (pair, side, ids), decoded in zip(items, texts):
        text = getattr(pair, side)
        if decoded != text:
            # The sampling tokenizer's folder may set clean_up_tokenization_spaces the other way
            # (same vocabulary, same fingerprint): the ids are still the sampled tokens.
            cleanup = getattr(tokenizer, "clean_up_tokenization_spaces", False)
            if tokenizer.decode(ids, skip_special_tokens=True,
                                clean_up_tokenization_spaces=not cleanup) == text:
                continue
            at = next((k for k, (a, b) in enumerate(zip(decoded, text)) if a != b),
                      min(len(decoded), len(text)))
            raise UserError(f"{pair.where or 'pair'}: field `{side}_ids` does not decode to the "
                            f"`{side}` text (first difference at character {at}: ids give "
                            f"{_show(decoded, at)}, text has {_show(text, at)}); ids and text must "
                            f"come from the same generation")


def check_stored_ids(tokenizer, pairs: Sequence[Pair], *, eot_id: int | None = None) -> IdsUsage:
    """Check every stored id list this tokenizer would use against its text (UserError naming
    the pair's file and line), up front instead of mid-epoch; count the sides by token source."""
    usage = IdsUsage()
    fingerprint = None
    items = []
    for p in pairs:
        for side in SIDES:
            if getattr(p, f"{side}_ids") is None:
                usage.text += 1
                continue
            fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
            ids = stored_ids(p, side, fingerprint)
            if ids is None:
                usage.other_tokenizer += 1
            else:
                usage.ids += 1
                items.append((p, side, ids))
    if items:
        _check_ids_match_text(tokenizer, items, end_of_turn_id(tokenizer) if eot_id is None else eot_id)
    return usage


class PairTokenizer:
    """Callable pair -> TokenizedPair with the tokenizer's special ids looked up once.

    Responses use their stored token ids where trusted (module docstring). Picklable (grain
    may run it in worker threads or processes).
    """

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int,
                 plain_fallback: bool = False, eot_id: int | None = None,
                 max_response_length: int | None = None, ids_checked: bool = False):
        check_lengths(max_length, max_prompt_length)
        # ids_checked: the pairs' stored ids already passed `check_stored_ids` (the trainer checks
        # each epoch's file once when reading it), so batches skip decoding them again.
        self.ids_checked = ids_checked
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.plain_fallback = plain_fallback
        self.eot_id = end_of_turn_id(tokenizer) if eot_id is None else int(eot_id)
        self.pad_id = pad_token_id(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self._fingerprint: str | None = None   # computed when a pair first has stored ids

    def responses(self, pairs: Sequence[Pair], side: str) -> list[list[int]]:
        """One side's response ids (without end-of-turn) of each pair: its trusted stored ids,
        checked against the text, else the encoded text."""
        if self._fingerprint is None and any(getattr(p, f"{side}_ids") is not None for p in pairs):
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        out = [stored_ids(p, side, self._fingerprint) for p in pairs]
        if not self.ids_checked:
            _check_ids_match_text(self.tokenizer, [(p, side, ids) for p, ids in zip(pairs, out)
                                                   if ids is not None], self.eot_id)
        todo = [k for k, ids in enumerate(out) if ids is None]
        for k, ids in zip(todo, encode_texts(self.tokenizer, [getattr(pairs[k], side) for k in todo])):
            out[k] = ids
        return out

    def tokenize(self, pairs: Sequence[Pair]) -> list[TokenizedPair]:
        """Tokenise many pairs with batched tokenizer calls."""
        prompts = encode_prompts(self.tokenizer, [p.messages for p in pairs],
                                 plain_fallback=self.plain_fallback,
                                 wheres=[p.where for p in pairs])
        chosen = self.responses(pairs, "chosen")
        rejected = self.responses(pairs, "rejected")
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
                  length_buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Stack B tokenised pairs into the [chosen; rejected] batch arrays (module docstring).

    T is `max_length`, or with `length_buckets` the smallest bucket holding the longest row
    (capped at max_length) - fewer padded tokens, but one compiled shape per bucket.
    """
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
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "valid": valid}


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
    response_ids = np.full((b, 2, r_len), pad_id, np.int32)
    response_mask = np.zeros((b, 2, r_len), np.int32)
    labels = np.full((b, 2, r_len), IGNORE_INDEX, np.int32)
    for i, p in enumerate(pairs):
        lp = len(p.prompt_ids)
        if lp:
            prompt_ids[i, p_len - lp:] = p.prompt_ids
            prompt_mask[i, p_len - lp:] = 1
        for half, response in enumerate((p.chosen_ids, p.rejected_ids)):
            lr = len(response)
            response_ids[i, half, :lr] = response
            response_mask[i, half, :lr] = 1
            labels[i, half, :lr] = response
            if not lp and lr:
                labels[i, half, 0] = IGNORE_INDEX   # nothing precedes it to predict it
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
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "shared_prompt":
        return partial(collate_shared_prompts, max_prompt_length=max_prompt_length,
                       max_response_length=max_response_length(layout, max_length, max_prompt_length),
                       pad_id=pad_id, length_buckets=length_buckets)
    return partial(collate_pairs, max_length=max_length, pad_id=pad_id, length_buckets=length_buckets)


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
