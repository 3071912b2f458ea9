"""Generate responses with the JAX sampler: Python API and the engine of `distillm2 generate`.

    from distillm2_jax import generate
    results = generate.sample(model, prompt_ids, max_new_tokens=1024, temperature=0.8,
                              top_p=0.95, eos_ids=[eos], seed=42, batch_size=16)
    summary = generate.generate_file(model, "prompts.jsonl", "out.jsonl", tokenizer=tok, ...)

`sample` splits the prompts into batches of a fixed size in the given order (the last batch
padded with dummy rows), left-pads each batch to a length bucket (powers of two from 16), and
runs the compiled prefill + decode loop of `distillm2_jax.sampling`, syncing with the host every
`sync_every` steps for the progress bar and to stop early once every row is done. So a run
compiles one program per prompt-length bucket, whatever the number of prompts.

`generate_file` writes one JSON line per prompt in source order (the generation-output format
of `distillm2_jax.data.generations`, with the sampled `response_ids`), flushed and fsynced per
batch, with a sidecar `OUT.meta.json` holding the arguments. Rerunning with the same arguments
continues after the last complete line; since each row's random key depends on (seed, row id)
and batches are fixed groups of the source order, the finished file is the one an
uninterrupted run writes.
See docs/generation.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from distillm2_jax import sharding as shd
from distillm2_jax.errors import UserError
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.sampling.decode import (
    SamplingConfig,
    decode,
    prefill,
    stop_id_array,
    unstack_layers_jit,
)

META_FORMAT = "distillm2-generate/1"
MIN_BUCKET = 16
FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class Result:
    """One generated row.

    tokens: the new token ids; when finish_reason == "stop" the last one is the stop token.
    finish_reason: "stop" (emitted a stop/EOS id) or "length" (reached max_new_tokens).
    prompt_tokens: real (unpadded) prompt length; new_tokens: len(tokens).
    """

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    new_tokens: int


# ----------------------------------------------------------------------------- helpers

def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """The padded prompt length for a longest prompt of n tokens.

    Default buckets: powers of two from 16 (16, 32, 64, ...). With explicit `buckets`, the
    smallest one >= n; a prompt longer than all of them gets the next power of two.
    """
    if n <= 0:
        raise ValueError("prompt length must be positive")
    if buckets:
        fitting = [b for b in sorted(buckets) if b >= n]
        if fitting:
            return int(fitting[0])
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def row_seed(row_id: int | str) -> int:
    """The uint32 RNG identity of a row: an int modulo 2**32, a string hashed (sha256)."""
    if isinstance(row_id, (int, np.integer)) and not isinstance(row_id, bool):
        return int(row_id) % (1 << 32)
    return int.from_bytes(hashlib.sha256(str(row_id).encode()).digest()[:4], "little")


def model_parts(model) -> tuple[dict, ModelConfig, str]:
    """(params, config, compute dtype name) of a `Decoder`, or of a `(params, config)` or
    `(params, config, compute_dtype)` tuple (compute dtype default: the embedding's dtype)."""
    if isinstance(model, tuple) and len(model) in (2, 3):
        params, cfg = model[:2]
        cdt = model[2] if len(model) == 3 else None
    else:
        params, cfg = model.params(), model.config
        cdt = getattr(model, "compute_dtype", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("model must be a models.Decoder or a (params, ModelConfig[, compute_dtype]) tuple")
    return params, cfg, jnp.dtype(cdt or params["embed"].dtype).name


def _batch_shards(mesh) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in shd.DEFAULT_RULES["batch"]]))


def _params_on_mesh(params, cfg: ModelConfig, mesh):
    """Params as they are if already on `mesh`, else placed by the logical rules (LoRA: replicated)."""
    leaves = jax.tree.leaves(params)
    if all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
           for x in leaves):
        return params
    from distillm2_jax.models import param_shardings

    known = param_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, x):
        node = known
        for key in path:
            name = getattr(key, "key", None)
            node = node.get(name) if isinstance(node, dict) else None
            if node is None:
                break
        return shd.put_global(x, node if isinstance(node, NamedSharding) else replicated)

    return jax.tree_util.tree_map_with_path(place, params)


def _put(x, axes, mesh):
    if mesh is None:
        return jnp.asarray(x)
    if not axes:
        return shd.put_global(x, NamedSharding(mesh, PartitionSpec()))
    return shd.put(np.asarray(x), axes, mesh)


def _to_host(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- sampling

def iter_sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                eos_ids: Sequence[int] = (), seed: int = 0, batch_size: int = 8, mesh=None,
                row_ids: Sequence[int | str] | None = None, pad_id: int = 0,
                prompt_buckets: Sequence[int] | None = None, start_batch: int = 0,
                progress: bool = False, sync_every: int = 32, desc: str = "generate"
                ) -> Iterator[tuple[list[int], list[Result]]]:
    """Yield (row indices, results) batch by batch, in order (see `sample` for the arguments).

    Batch b holds rows [b * B, (b + 1) * B) (B = batch_size rounded up to a multiple of the
    mesh's batch shards); `start_batch` skips the first batches without computing them.
    """
    params, cfg, cdt = model_parts(model)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if sync_every <= 0:
        raise ValueError(f"sync_every must be positive, got {sync_every}")
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty")
        if p.min() < 0 or p.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
    ids_of_rows = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(ids_of_rows) != len(prompts):
        raise ValueError(f"{len(ids_of_rows)} row_ids for {len(prompts)} prompts")
    if mesh is not None and mesh.size == 1:
        mesh = None  # nothing to shard
    shards = _batch_shards(mesh)
    B = -(-max(1, int(batch_size)) // shards) * shards
    if mesh is not None:
        params = _params_on_mesh(params, cfg, mesh)
    params = unstack_layers_jit(params)  # per-layer weights for the unrolled decode loop
    static = dict(sampling=sampling, pad_id=int(pad_id), compute_dtype=cdt)
    key = _put(jax.random.key(int(seed)), (), mesh)
    stops = _put(stop_id_array(eos_ids), (), mesh)
    n_batches = -(-len(prompts) // B)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), initial=min(start_batch * B, len(prompts)), desc=desc,
               unit="prompt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    total_new, t_start = 0, time.perf_counter()
    try:
        for b in range(start_batch, n_batches):
            rows = list(range(b * B, min((b + 1) * B, len(prompts))))
            P = bucket_length(max(prompts[r].size for r in rows), prompt_buckets)
            ids = np.full((B, P), pad_id, np.int32)
            mask = np.zeros((B, P), bool)
            real = np.zeros((B,), bool)
            rid = np.zeros((B,), np.uint32)
            for j, r in enumerate(rows):
                n = prompts[r].size
                ids[j, P - n:] = prompts[r]
                mask[j, P - n:] = True
                real[j] = True
                rid[j] = row_seed(ids_of_rows[r])
            mask[len(rows):, -1] = True  # dummy rows: one pad token, done from the start
            state = prefill(params, cfg, _put(ids, ("batch", "length"), mesh),
                            _put(mask, ("batch", "length"), mesh), key, _put(rid, ("batch",), mesh),
                            _put(real, ("batch",), mesh), stops, max_new_tokens=max_new_tokens,
                            record_logits=False, mesh=mesh, **static)
            step = 1
            while True:
                done, num_new = _to_host(state.done), _to_host(state.num_new)
                if progress:
                    rate = (total_new + int(num_new[real].sum())) / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=True)
                if done.all() or step >= max_new_tokens:
                    break
                step = min(step + sync_every, max_new_tokens)
                state = decode(params, cfg, state, stops, jnp.int32(step), **static)
            tokens, stopped = _to_host(state.tokens), _to_host(state.stopped)
            results = []
            for j, r in enumerate(rows):
                n = int(num_new[j])
                results.append(Result(tokens=tokens[j, :n].tolist(),
                                      finish_reason=FINISH_STOP if stopped[j] else FINISH_LENGTH,
                                      prompt_tokens=int(prompts[r].size), new_tokens=n))
                total_new += n
            bar.update(len(rows))
            yield rows, results
    finally:
        bar.close()


def sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           eos_ids: Sequence[int] = (), seed: int = 0, batch_size: int = 8, mesh=None,
           row_ids: Sequence[int | str] | None = None, pad_id: int = 0,
           prompt_buckets: Sequence[int] | None = None, progress: bool = False,
           sync_every: int = 32) -> list[Result]:
    """Generate a continuation of every prompt (token id lists); one `Result` per prompt, in order.

    model: a `models.Decoder` or a `(params, ModelConfig)` pair (e.g. the student's current
    params during training). temperature 0 = greedy; top_k 0 / top_p 1.0 = off (applied in the
    order temperature, top-k, top-p). eos_ids: ids that end a row (kept as its last token).
    seed + row_ids (default: the prompt's index; strings are hashed) fix each row's random
    stream, independent of batching. mesh: shard the batch over its data/fsdp axes (params are
    placed by the logical rules unless already on the mesh). pad_id only fills padding.
    """
    out: list[Result] = []
    for _, results in iter_sample(model, prompt_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  eos_ids=eos_ids, seed=seed, batch_size=batch_size, mesh=mesh,
                                  row_ids=row_ids, pad_id=pad_id, prompt_buckets=prompt_buckets,
                                  progress=progress, sync_every=sync_every):
        out.extend(results)
    return out


# ----------------------------------------------------------------------------- JSONL output

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

    def describe(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.finish_reasons.items())) or "none"
        resumed = f" (resumed after {self.rows_existing} existing rows)" if self.rows_existing else ""
        return (f"wrote {self.rows_written} of {self.rows_total} rows{resumed}, {self.new_tokens} new "
                f"tokens in {self.seconds:.1f} s ({rate:,.0f} tok/s); finish reasons: {reasons}")


def meta_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.meta.json")


def _prompts_digest(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(str(p.id).encode() + b"\0")
        h.update(np.asarray(p.input_ids, np.int64).tobytes() + b"\1")
    return h.hexdigest()


def model_files_digest(model_dir: str | os.PathLike) -> str:
    """A cheap fingerprint of a model folder: names, sizes and mtimes of config + weights."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.json"))):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _agreed(existing: int) -> int:
    """Process 0's count of existing rows, on every process: all of them must start from the
    same batch (they run its collectives together), and only process 0 writes the file."""
    if jax.process_count() == 1:
        return existing
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(existing)))


def _read_existing(out: Path, prompt_ids_in_order: list[str], *, truncate: bool = True) -> int:
    """Number of complete rows already in `out` (a prefix of the source order).

    A trailing partial line (a write cut short) is not counted, and removed from the file when
    `truncate` (the writing process). Anything else that does not match the expected rows
    raises UserError.
    """
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if truncate:
            with open(out, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        data = data[:keep]
    n = 0
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{out}: not UTF-8 text (byte offset {err.start}); the file is damaged: pass "
                        f"--overwrite to start over") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rid = str(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError, RecursionError):  # ValueError: JSON syntax, huge ints
            raise UserError(f"{out}:{lineno}: not a generation record with an `id`; the file is "
                            f"damaged: pass --overwrite to start over") from None
        if n >= len(prompt_ids_in_order) or rid != prompt_ids_in_order[n]:
            want = prompt_ids_in_order[n] if n < len(prompt_ids_in_order) else "(none: all done)"
            raise UserError(f"{out}:{lineno}: row id {rid!r} where {want!r} was expected; the file "
                            f"was not written by this run's prompts: pass --overwrite to start over")
        n += 1
    return n


def generate_file(model, prompts, out: str | os.PathLike, *, tokenizer,
                  max_new_tokens: int = 1024, temperature: float = 0.8, top_p: float = 0.95,
                  top_k: int = 0, max_prompt_length: int | None = 512, seed: int = 42,
                  batch_size: int = 16, mesh=None, model_name: str | None = None,
                  stop_ids: Sequence[int] | None = None, overwrite: bool = False,
                  progress: bool = True, extra_fields: dict[str, Any] | None = None,
                  prompt_field: str | None = None, limit: int | None = None,
                  plain_fallback: bool = False, sync_every: int = 32) -> GenerateSummary:
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
    """
    from distillm2_jax.data.chat import pad_token_id, stop_token_ids
    from distillm2_jax.data.generations import make_generation_record, tokenizer_fingerprint
    from distillm2_jax.data.prompts import load_templated_prompts

    t0 = time.perf_counter()
    if isinstance(tokenizer, (str, os.PathLike)):
        from distillm2_jax.train.epoch_data import load_tokenizer

        tokenizer = load_tokenizer(os.fspath(tokenizer))
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
    stops = sorted({int(i) for i in (stop_token_ids(tokenizer) if stop_ids is None else stop_ids)})
    pad = pad_token_id(tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    out = Path(out)
    args = {
        "model": model_name or "(in-memory model)",
        "prompts_sha256": _prompts_digest(prompts), "num_prompts": len(prompts),
        "max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
        "top_p": float(top_p), "top_k": int(top_k), "max_prompt_length": max_prompt_length,
        "seed": int(seed), "batch_size": int(batch_size), "stop_ids": stops, "dtype": cdt,
        "extra_fields": extra_fields or {},
    }
    if isinstance(model_name, str) and os.path.isdir(model_name):
        args["model_files"] = model_files_digest(model_name)
    meta = {"format": META_FORMAT, "args": args,
            "info": {"prompts": spec, "mesh": None if mesh is None else dict(mesh.shape),
                     "sync_every": sync_every, "tokenizer": fingerprint}}
    mpath = meta_path(out)
    writer = jax.process_index() == 0
    existing = 0
    if overwrite:
        if writer:
            for p in (out, mpath):
                if p.exists():
                    p.unlink()
    elif out.exists():
        if not mpath.exists():
            raise UserError(f"{out} exists but {mpath.name} does not, so it cannot be checked "
                            f"that it was made with these arguments: pass --overwrite to replace it")
        _check_meta(mpath, args, out)
        existing = _read_existing(out, [str(p.id) for p in prompts], truncate=writer)
    existing = _agreed(existing)
    if writer:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(mpath, meta)
    shards = _batch_shards(mesh)
    B = -(-max(1, int(batch_size)) // shards) * shards
    reasons: dict[str, int] = {}
    written = new_tokens = 0
    if existing < len(prompts):
        f = open(out, "a", encoding="utf-8") if writer else None
        try:
            for rows, results in iter_sample(
                    (params, cfg, cdt),
                    [p.input_ids for p in prompts], max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=stops, seed=seed,
                    batch_size=B, mesh=mesh, row_ids=[str(p.id) for p in prompts], pad_id=pad,
                    start_batch=existing // B, progress=progress, sync_every=sync_every,
                    desc=out.name):
                keep = [(r, res) for r, res in zip(rows, results) if r >= existing]
                ids = [response_ids(res) for _, res in keep]
                texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                lines = []
                for (r, res), rids, text in zip(keep, ids, texts):
                    rec = make_generation_record(
                        id=str(prompts[r].id), prompt=prompts[r].prompt, response=text,
                        finish_reason=res.finish_reason, prompt_tokens=res.prompt_tokens,
                        response_tokens=res.new_tokens, response_ids=rids, tokenizer=fingerprint,
                        **{"model": args["model"], **(extra_fields or {})})
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                    reasons[res.finish_reason] = reasons.get(res.finish_reason, 0) + 1
                    new_tokens += res.new_tokens
                if f is not None:
                    f.write("".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                written += len(keep)
        finally:
            if f is not None:
                f.close()
    return GenerateSummary(path=str(out), rows_total=len(prompts), rows_existing=existing,
                           rows_written=written, new_tokens=new_tokens,
                           seconds=time.perf_counter() - t0, finish_reasons=reasons)


def _check_meta(mpath: Path, args: dict, out: Path) -> None:
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
        old = meta["args"]
        if meta.get("format") != META_FORMAT or not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise UserError(f"{mpath}: not a distillm2 generate sidecar: pass --overwrite to start "
                        f"over") from None
    new = json.loads(json.dumps(args))  # the same JSON types as the stored copy
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    if diffs:
        raise UserError(f"{out} was written with different arguments ({'; '.join(diffs)}): rerun "
                        f"with the same arguments to continue it, or pass --overwrite to start over")
