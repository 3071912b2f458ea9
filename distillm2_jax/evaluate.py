"""Evaluation of a model on held-out pairs: token NLL and perplexity of the teacher responses.

Figure 1(b) of the paper measures exactly this (NLL of teacher-generated responses under the
trained student; lower is better). Only response tokens (and the EOS that ends them) count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from distillm2_jax import answers, objectives
from distillm2_jax.data.batches import make_batch
from distillm2_jax.data.chat import encode_prompts, pad_token_id, stop_token_ids
from distillm2_jax.data.messages import prompt_from_value
from distillm2_jax.data.pairs import read_pairs
from distillm2_jax.generation import bucket_length, sample
from distillm2_jax.models import align_vocab, decoder
from distillm2_jax.sampling.speculative import SpeculativeStats


@dataclasses.dataclass(frozen=True)
class NLLResult:
    nll: float          # mean NLL per response token (nats)
    perplexity: float   # exp(nll)
    tokens: int         # response tokens counted
    sequences: int


@functools.partial(jax.jit, static_argnames=("cfg", "chunk_size"))
def _token_nll_sums(params, cfg, input_ids, attention_mask, labels, chunk_size):
    hidden, _ = decoder.forward(params, cfg, input_ids, attention_mask)
    logp, tokens = objectives.label_logprobs(hidden, decoder.output_head(params, cfg), labels,
                                             chunk_size=chunk_size, softcap=cfg.final_softcap)
    return -jnp.sum(logp), jnp.sum(tokens)


def nll(model, pairs, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
        max_prompt_length: int = 512, chunk_size: int = 256) -> NLLResult:
    """NLL of the `chosen` (teacher) responses of `pairs` (a list or a pair-file spec) under `model`."""
    if isinstance(pairs, (str, bytes)) or hasattr(pairs, "__fspath__"):
        pairs = read_pairs(pairs)
    params, cfg = model.params(), model.config
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start:start + batch_size])
        batch = make_batch(chunk, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        # Only the chosen rows [0:B].
        ids, mask, labels = (np.asarray(batch[k][:len(chunk)]) for k in ("input_ids", "attention_mask", "labels"))
        s, n = _token_nll_sums(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels),
                               chunk_size=chunk_size)
        total += float(s)
        count += int(n)
    mean = total / max(count, 1)
    return NLLResult(nll=mean, perplexity=math.exp(mean) if count else float("nan"), tokens=count,
                     sequences=len(pairs))


# --------------------------------------------------------------------------- generation-based


def _messages(prompt) -> list:
    return prompt_from_value(prompt, "prompt", "prompt")[1]


def respond(model, prompts, tokenizer, *, max_new_tokens: int = 256, temperature: float = 0.0,
            batch_size: int = 32, max_prompt_length: int = 512, seed: int = 0, top_p: float = 1.0) -> list[str]:
    """One response per prompt (a string or a messages list), greedy by default, decoded text
    (top_p < 1: nucleus sampling, e.g. the paper's student answers at T 0.8, top-p 0.95).

    The model's logits are sliced to the tokenizer's vocabulary first (`models.align_vocab`), so
    padding rows of a larger head (Qwen2.5-7B: 152064 rows) are never sampled.
    """
    align_vocab(len(tokenizer), model)

    encoded = encode_prompts(tokenizer, [_messages(p) for p in prompts], max_prompt_length=max_prompt_length)
    stops = set(stop_token_ids(tokenizer))
    results = sample(model, [e.input_ids.tolist() for e in encoded], max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, eos_ids=tuple(stops), seed=seed,
                     batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    return [tokenizer.decode([t for t in r.tokens if t not in stops], skip_special_tokens=True) for r in results]


@dataclasses.dataclass(frozen=True)
class ExactMatchResult:
    accuracy: float          # correct / total
    correct: int
    total: int
    malformed: int           # responses with no extractable answer (counted as wrong)
    responses: list[str]     # the model's responses, in the order of the records


def exact_match(model, records, tokenizer, *, extract=None, correct=None, **respond_kwargs) -> ExactMatchResult:
    """Greedy-decode every record's `prompt` and compare the extracted answer with its `answer`.

    records: dicts with `prompt` and `answer`. extract(prompt, response) -> answer or None
    (malformed) and correct(prompt, response, answer) -> bool default to the generic
    `answers.extract_answer` / `answers.exact_match`; the demo passes its task's checker.
    """
    extract = extract or (lambda prompt, response: answers.extract_answer(response))
    correct = correct or (lambda prompt, response, answer: answers.exact_match(response, answer))
    responses = respond(model, [r["prompt"] for r in records], tokenizer, **respond_kwargs)
    good = bad = 0
    for rec, resp in zip(records, responses):
        if extract(rec["prompt"], resp) is None:
            bad += 1
        elif correct(rec["prompt"], resp, rec["answer"]):
            good += 1
    return ExactMatchResult(good / max(len(records), 1), good, len(records), bad, responses)


@dataclasses.dataclass(frozen=True)
class AcceptanceResult:
    """Speculative decoding with the evaluated model as the draft and a target model.

    rate: mean over response positions of sum_v min(p_target, q_draft), the probability that
    speculative sampling (Leviathan et al., 2023) accepts a drafted token at temperature 1.
    greedy_rate: fraction of positions where both models' argmax agree (greedy drafting).
    draft_nll: the draft's mean NLL of the responses (nats/token), what `nll(draft, ...)` gives,
    computed in the same pass so an evaluation needing both runs the draft once.
    Positions are those of the given responses (the target's samples: the contexts speculative
    decoding visits, since its output follows the target's distribution).
    """
    rate: float
    greedy_rate: float
    tokens: int
    draft_nll: float

    def tokens_per_target_call(self, draft_length: int) -> float:
        """Expected tokens per target forward with `draft_length` drafted tokens: (1-a^(k+1))/(1-a)."""
        a = self.rate
        if a >= 1.0:
            return float(draft_length + 1)
        return (1.0 - a ** (draft_length + 1)) / (1.0 - a)


@functools.partial(jax.jit, static_argnames=("dcfg", "tcfg", "chunk_size", "vocab"))
def _acceptance_sums(dparams, dcfg, tparams, tcfg, input_ids, attention_mask, labels, chunk_size, vocab):
    """Sums over response positions, chunk by chunk along the sequence (never [B, T, V] at once).

    The draft's head is applied whole: its NLL is normalized over all its rows, as in `nll`; the
    acceptance compares both models over the first `vocab` (the tokenizer's) ids.
    """
    hd = decoder.forward(dparams, dcfg, input_ids, attention_mask)[0]
    ht = decoder.forward(tparams, tcfg, input_ids, attention_mask)[0]
    # The loss's chunk walk: chunks without a label skip both heads.
    lab, (hd, ht) = objectives.chunk_by_labels(objectives.shifted_labels(labels), chunk_size, hd, ht)

    def one(args):
        hd_c, ht_c, lab_c = args
        return jax.lax.cond(jnp.any(lab_c != objectives.IGNORE_INDEX), heads, lambda *_: tuple(jnp.float32(0) for _ in range(4)),
                            hd_c, ht_c, lab_c)

    def heads(hd_c, ht_c, lab_c):
        m_c = lab_c != objectives.IGNORE_INDEX
        draft_logits = decoder.logits_from_hidden(dparams, dcfg, hd_c)
        lq_whole = jax.nn.log_softmax(draft_logits, axis=-1)
        # Over the tokenizer's ids only when the head has padding rows (else the same array).
        lq = lq_whole if draft_logits.shape[-1] == vocab else jax.nn.log_softmax(draft_logits[..., :vocab], axis=-1)
        lp = jax.nn.log_softmax(decoder.logits_from_hidden(tparams, tcfg, ht_c), axis=-1)
        accept = jnp.sum(jnp.minimum(jnp.exp(lp), jnp.exp(lq)), axis=-1)
        agree = jnp.argmax(lp, axis=-1) == jnp.argmax(lq, axis=-1)
        label_lq = jnp.take_along_axis(lq_whole, jnp.where(m_c, lab_c, 0)[..., None], axis=-1)[..., 0]
        m_c = m_c.astype(jnp.float32)
        return (jnp.sum(accept.astype(jnp.float32) * m_c), jnp.sum(agree * m_c), jnp.sum(m_c),
                -jnp.sum(label_lq.astype(jnp.float32) * m_c))

    a, g, c, nll_sum = jax.lax.map(one, (hd, ht, lab))
    return jnp.sum(a), jnp.sum(g), jnp.sum(c), jnp.sum(nll_sum)


def _colocate(*trees):
    """The trees unchanged when their arrays live on the same devices, else all on one device
    (e.g. a student restored onto a training mesh next to a teacher loaded on one device)."""
    devices = [frozenset(d for x in jax.tree.leaves(t) for d in x.devices()) for t in trees]
    if len(set(devices)) <= 1:
        return trees
    one = jax.devices()[0]
    return tuple(jax.device_put(t, one) for t in trees)


def acceptance_rate(draft, target, pairs, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
                    max_prompt_length: int = 512, chunk_size: int = 256) -> AcceptanceResult:
    """Acceptance rate of `draft` proposing tokens for `target` on the `chosen` responses of `pairs`.

    Both models must share the tokenizer (their heads are compared over `len(tokenizer)` ids).
    """
    if isinstance(pairs, (str, bytes)) or hasattr(pairs, "__fspath__"):
        pairs = read_pairs(pairs)
    vocab = len(tokenizer)
    dcfg = draft.config
    tcfg = dataclasses.replace(target.config, logits_vocab=vocab)
    for name, rows in (("draft", dcfg.output_vocab), ("target", tcfg.vocab_size)):
        if rows < vocab:
            raise ValueError(f"{name} model has {rows} output rows, fewer than the tokenizer's {vocab}")
    dparams, tparams = _colocate(draft.params(), target.params())
    acc = agree = count = nll_total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start:start + batch_size])
        batch = make_batch(chunk, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        n = len(chunk)
        a, g, c, s = _acceptance_sums(dparams, dcfg, tparams, tcfg,
                                      jnp.asarray(batch["input_ids"][:n]), jnp.asarray(batch["attention_mask"][:n]),
                                      jnp.asarray(batch["labels"][:n]),
                                      chunk_size=chunk_size, vocab=vocab)
        acc, agree, count, nll_total = acc + float(a), agree + float(g), count + int(c), nll_total + float(s)
    return AcceptanceResult(acc / max(count, 1), agree / max(count, 1), int(count),
                            nll_total / count if count else float("nan"))


# --------------------------------------------------------------------------- speculative decoding


@dataclasses.dataclass(frozen=True)
class SpeedupResult:
    """Measured speculative decoding (`sampling.speculative`) of `target` with `draft` against
    plain decoding of `target`, on the same prompts and settings, compile time excluded.

    plain_tokens_per_s / speculative_tokens_per_s: new tokens per second of the best run of
    each (runs interleaved, so load from other processes hits both); speedup: their ratio.
    acceptance_rate / tokens_per_target_call: of the speculative runs (`SpeculativeStats`).
    same_tokens: every row's tokens equal plain decoding's (expected when greedy; with sampling
    the two draw different random numbers).
    """
    plain_tokens_per_s: float
    speculative_tokens_per_s: float
    speedup: float
    acceptance_rate: float
    tokens_per_target_call: float
    draft_tokens: int
    tokens: int
    rows: int
    same_tokens: bool


def measure_speedup(target, draft, prompt_ids, *, draft_tokens: int = 4, max_new_tokens: int = 128,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids=(), seed: int = 0,
                    batch_size: int = 16, pad_id: int = 0, repeats: int = 2) -> SpeedupResult:
    """Decode `prompt_ids` (token-id lists) plainly and speculatively, `repeats` interleaved runs
    each after one warm-up batch per method (same compiled shapes: one prompt bucket), and
    compare the best runs. Both models must share the vocabulary (`models.align_vocab`).
    """
    prompt_ids = [list(p) for p in prompt_ids]
    if not prompt_ids:
        raise ValueError("measure_speedup needs at least one prompt")
    kw = dict(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p, top_k=top_k,
              eos_ids=tuple(eos_ids), seed=seed, batch_size=batch_size, pad_id=pad_id,
              prompt_buckets=[bucket_length(max(len(p) for p in prompt_ids))])
    spec_kw = dict(draft=draft, draft_tokens=draft_tokens)
    sample(target, prompt_ids[:batch_size], **kw)                  # warm-up: compile both
    sample(target, prompt_ids[:batch_size], **kw, **spec_kw)
    best = {"plain": math.inf, "spec": math.inf}
    stats = plain = spec = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        plain = sample(target, prompt_ids, **kw)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        stats = SpeculativeStats(draft_tokens)
        t0 = time.perf_counter()
        spec = sample(target, prompt_ids, **kw, **spec_kw, stats=stats)
        best["spec"] = min(best["spec"], time.perf_counter() - t0)
    tokens = sum(r.new_tokens for r in plain)
    spec_tokens = sum(r.new_tokens for r in spec)
    return SpeedupResult(plain_tokens_per_s=tokens / best["plain"], speculative_tokens_per_s=spec_tokens / best["spec"],
                         speedup=(spec_tokens / best["spec"]) / (tokens / best["plain"]),
                         acceptance_rate=stats.acceptance_rate, tokens_per_target_call=stats.tokens_per_target_call,
                         draft_tokens=int(draft_tokens), tokens=tokens, rows=len(prompt_ids),
                         same_tokens=[r.tokens for r in plain] == [r.tokens for r in spec])


def measure_speedup_on_prompts(draft, target, prompts, tokenizer, *, max_prompt_length: int = 512,
                               **kwargs) -> SpeedupResult:
    """`measure_speedup` on prompts (strings or messages lists) rendered by the tokenizer's chat
    template, stopping at its EOS / end-of-turn ids (the models' vocabularies aligned to it)."""
    align_vocab(len(tokenizer), draft, target)
    encoded = encode_prompts(tokenizer, [_messages(p) for p in prompts], max_prompt_length=max_prompt_length)
    return measure_speedup(target, draft, [e.input_ids.tolist() for e in encoded],
                           eos_ids=tuple(stop_token_ids(tokenizer)), pad_id=pad_token_id(tokenizer), **kwargs)
