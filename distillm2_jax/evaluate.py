"""Evaluation of a model on held-out pairs: token NLL and perplexity of the teacher responses.

Figure 1(b) of the paper measures exactly this (NLL of teacher-generated responses under the
trained student; lower is better). Only response tokens (and the EOS that ends them) count.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from distillm2_jax import losses
from distillm2_jax.data.batches import make_batch
from distillm2_jax.data.pairs import read_pairs
from distillm2_jax.models import decoder


@dataclasses.dataclass(frozen=True)
class NLLResult:
    nll: float          # mean NLL per response token (nats)
    perplexity: float   # exp(nll)
    tokens: int         # response tokens counted
    sequences: int


@functools.partial(jax.jit, static_argnames=("cfg", "chunk_size"))
def _token_nll_sums(params, cfg, input_ids, attention_mask, labels, chunk_size):
    hidden, _ = decoder.forward(params, cfg, input_ids, attention_mask)
    # seqkd's metrics carry the per-sequence mean log-prob of the labels and token counts
    _, m = losses.chunked_objective("seqkd", hidden, decoder.output_head(params, cfg), None, None, labels,
                                    num_pairs=input_ids.shape[0] // 2, chunk_size=chunk_size,
                                    student_softcap=cfg.final_softcap, grad_mode="remat")
    return -jnp.sum(m["student_logp_seq"] * m["tokens_seq"]), jnp.sum(m["tokens_seq"])


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
        labels = np.array(batch["labels"])
        labels[len(chunk):] = losses.IGNORE_INDEX  # rows [B:2B] are the rejected responses
        s, n = _token_nll_sums(params, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                               jnp.asarray(labels), chunk_size=min(chunk_size, labels.shape[1]))
        total += float(s)
        count += int(n)
    mean = total / max(count, 1)
    return NLLResult(nll=mean, perplexity=math.exp(mean) if count else float("nan"), tokens=count,
                     sequences=len(pairs))
