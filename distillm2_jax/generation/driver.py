"""Sample one response per prompt and write them as a restartable JSONL file: `generate_file`.

    from distillm2_jax.generation import generate_file
    summary = generate_file(model, "prompts.jsonl", "out.jsonl", tokenizer=tok, seed=42)

The prompts are templated with the tokenizer, sampled with continuous batching
(`sampler.iter_sample`, results in source order) and written as generation records
(`data.generations`) by `writer.GenerationWriter`, which resumes after the last complete row
of an earlier run with the same arguments. Since each row's tokens depend only on (seed, row
id, prompt), never on which rows decoded beside it, a resumed file ends as an uninterrupted run
writes it. On several processes every one decodes its share of the slots, all start from
process 0's resume point, and process 0 writes. With `draft=` the model decodes speculatively
(docs/speculative.md). See docs/generation.md.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from distillm2_jax.data.chat import pad_token_id, stop_token_ids
from distillm2_jax.data.generations import make_generation_record, tokenizer_fingerprint
from distillm2_jax.data.prompts import load_templated_prompts
from distillm2_jax.data.tokenizer import load_tokenizer
from distillm2_jax.errors import UserError
from distillm2_jax.generation.sampler import FINISH_STOP, Result, iter_sample, model_parts
from distillm2_jax.generation.writer import GenerationWriter, model_files_digest, prompts_digest
from distillm2_jax.sampling.speculative import SpeculativeStats


def response_ids(result: Result) -> list[int]:
    """The sampled response ids a generation record stores: `result.tokens` without the stop
    token that ended the row (finish_reason "stop"), like the `response` text."""
    return result.tokens[:-1] if result.finish_reason == FINISH_STOP else list(result.tokens)


@dataclasses.dataclass
class GenerateSummary:
    """What `generate_file` did."""

    path: str
    rows_total: int
    rows_existing: int      # complete rows found in the file before this run
    rows_written: int
    new_tokens: int
    seconds: float
    finish_reasons: dict[str, int]
    speculative: SpeculativeStats | None = None   # with a draft: acceptance, tokens per target forward

    def describe(self) -> str:
        """One line for the log: rows written, resume point, throughput, finish reasons."""
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "none"
        resumed = f" (resumed after {self.rows_existing} existing rows)" if self.rows_existing else ""
        spec = f"; {self.speculative.describe()}" if self.speculative is not None and self.speculative.rounds else ""
        return (f"wrote {self.rows_written} of {self.rows_total} rows{resumed}, {self.new_tokens} new "
                f"tokens in {self.seconds:.1f} s ({rate:,.0f} tok/s); finish reasons: {reasons}{spec}")


def _agreed(existing: int) -> int:
    """Process 0's count of existing rows, on every process: all of them must start from the
    same batch (they run its collectives together), and only process 0 writes the file."""
    if jax.process_count() == 1:
        return existing
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(existing)))


def generate_file(model, prompts, out: str | os.PathLike, *, tokenizer,
                  max_new_tokens: int = 1024, temperature: float = 0.8, top_p: float = 0.95,
                  top_k: int = 0, max_prompt_length: int | None = 512, seed: int = 42,
                  batch_size: int = 16, mesh=None, model_name: str | None = None,
                  stop_ids: Sequence[int] | None = None, overwrite: bool = False,
                  progress: bool = True, extra_fields: dict[str, Any] | None = None,
                  prompt_field: str | None = None, limit: int | None = None,
                  plain_fallback: bool = False, sync_every: int = 32, draft=None, draft_tokens: int = 4,
                  draft_name: str | None = None) -> GenerateSummary:
    """Sample one response per prompt and write them as JSONL; restartable (see module doc).

    model: `models.Decoder` or `(params, ModelConfig)` (in memory, e.g. the current student).
    prompts: a source spec (`data.sources.load_prompts`) or a list of `data.prompts.TemplatedPrompt`.
    tokenizer: a transformers tokenizer or its folder; it templates the prompts and decodes
    the responses (skip_special_tokens=True). Each record also stores the sampled ids
    (`response_ids`, without the stop token) and the tokenizer's fingerprint (`tokenizer`), so
    that training uses the tokens as sampled. stop_ids default to the tokenizer's EOS and
    end-of-turn ids. model_name identifies the model in the sidecar and in each record's
    `model` field (the CLI passes the model folder); rerunning with other arguments raises
    UserError unless overwrite=True. extra_fields are added to every record (e.g. epoch).
    draft: a smaller model of the same tokenizer (same forms as `model`) for speculative decoding
    with `draft_tokens` drafted tokens per round (the same output distribution; its
    acceptance is in the summary); draft_name identifies it in the sidecar.
    """
    t0 = time.perf_counter()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    spec = None
    if isinstance(prompts, (str, os.PathLike)):
        spec = os.fspath(prompts)
        prompts = load_templated_prompts(spec, tokenizer, max_prompt_length=max_prompt_length,
                                         field=prompt_field, limit=limit, plain_fallback=plain_fallback)
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts to generate from")
    params, cfg, cdt = model_parts(model)
    vocab = len(tokenizer)
    if vocab > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab} tokens but the model's output head only "
                        f"{cfg.vocab_size} rows: wrong tokenizer for this model?")
    if vocab < cfg.output_vocab:  # never sample head rows the tokenizer cannot decode
        cfg = dataclasses.replace(cfg, logits_vocab=vocab)
    spec_stats = None
    if draft is not None:   # the draft samples over the same ids (as models.align_vocab does)
        dparams, dcfg, ddt = model_parts(draft)
        if vocab > dcfg.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens but the draft's output head only "
                            f"{dcfg.vocab_size} rows: the draft must share the model's tokenizer")
        if vocab < dcfg.output_vocab:
            dcfg = dataclasses.replace(dcfg, logits_vocab=vocab)
        if dcfg.output_vocab != cfg.output_vocab:
            raise UserError(f"the draft's logits cover {dcfg.output_vocab} ids and the model's {cfg.output_vocab}: "
                            "the draft must share the model's tokenizer")
        draft = (dparams, dcfg, ddt)
        spec_stats = SpeculativeStats(int(draft_tokens))
    stops = sorted({int(i) for i in (stop_token_ids(tokenizer) if stop_ids is None else stop_ids)})
    fingerprint = tokenizer_fingerprint(tokenizer)
    args = {
        "model": model_name or "(in-memory model)",
        "prompts_sha256": prompts_digest(prompts), "num_prompts": len(prompts),
        "max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
        "top_p": float(top_p), "top_k": int(top_k), "max_prompt_length": max_prompt_length,
        "seed": int(seed), "batch_size": int(batch_size), "stop_ids": stops, "dtype": cdt,
        "extra_fields": extra_fields or {},
    }
    if draft is not None:  # other random numbers than plain decoding, so another file
        args.update(draft=draft_name or "(in-memory draft)", draft_tokens=int(draft_tokens))
        if isinstance(draft_name, str) and os.path.isdir(draft_name):
            args["draft_files"] = model_files_digest(draft_name)
    if isinstance(model_name, str) and os.path.isdir(model_name):
        args["model_files"] = model_files_digest(model_name)
    info = {"prompts": spec, "mesh": None if mesh is None else dict(mesh.shape),
            "sync_every": sync_every, "tokenizer": fingerprint}
    ids = [str(p.id) for p in prompts]
    writer = GenerationWriter(out, args, info, is_writer=jax.process_index() == 0)
    existing = _agreed(writer.resume(ids, overwrite=overwrite))
    reasons: dict[str, int] = {}
    written = new_tokens = 0
    writer.start()
    with writer:
        if existing < len(prompts):
            for rows, results in iter_sample(
                    (params, cfg, cdt), [p.input_ids for p in prompts], max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=stops, seed=seed,
                    batch_size=batch_size, mesh=mesh, row_ids=ids, pad_id=pad_token_id(tokenizer),
                    start_row=existing, progress=progress, sync_every=sync_every,
                    desc=writer.out.name, draft=draft, draft_tokens=draft_tokens, stats=spec_stats):
                keep = list(zip(rows, results))
                sampled = [response_ids(res) for _, res in keep]
                texts = tokenizer.batch_decode(sampled, skip_special_tokens=True)
                writer.append([make_generation_record(
                    id=ids[r], prompt=prompts[r].prompt, response=text, finish_reason=res.finish_reason,
                    prompt_tokens=res.prompt_tokens, response_tokens=res.new_tokens, response_ids=rids,
                    tokenizer=fingerprint, **{"model": args["model"], **(extra_fields or {})})
                    for (r, res), rids, text in zip(keep, sampled, texts)])
                for _, res in keep:
                    reasons[res.finish_reason] = reasons.get(res.finish_reason, 0) + 1
                    new_tokens += res.new_tokens
                written += len(keep)
    seconds = time.perf_counter() - t0
    if spec_stats is not None:
        spec_stats.seconds = seconds
    return GenerateSummary(path=str(writer.out), rows_total=len(prompts), rows_existing=existing,
                           rows_written=written, new_tokens=new_tokens, seconds=seconds, finish_reasons=reasons,
                           speculative=spec_stats)
