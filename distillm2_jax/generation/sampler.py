"""Sample continuations of token-id prompts with the compiled JAX sampler, continuously batched.

`iter_sample` keeps `batch_size` slots decoding (`slots.run_slots`): as soon as rows finish,
the next prompts (in the given order, left-padded to a length bucket: powers of two from 16)
are prefilled into their slots while the other rows keep decoding, so on long-tailed response
lengths no slot idles until the batch's longest row ends (`continuous=False` gives that static
behaviour, for comparison). A run compiles a bounded number of programs whatever the number of
prompts, the weights are used in place (no second copy), and each row's random stream depends
only on (seed, row id), never on its slot or on what else decodes: greedy and seeded outputs
are those of static batches. Results come back in row order.

With `draft=` a smaller model of the same vocabulary proposes `draft_tokens` tokens per round and
the model verifies them in one forward (`sampling.speculative`): the same output distribution
(greedy: the same tokens), fewer forwards of the large model; `stats=` collects the acceptance.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from distillm2_jax import sharding as shd
from distillm2_jax.models import param_shardings
from distillm2_jax.models.config import ModelConfig
from distillm2_jax.generation.slots import PlainEngine, run_slots
from distillm2_jax.sampling.decode import SamplingConfig, stop_id_array
from distillm2_jax.sampling.speculative import SpeculativeEngine, SpeculativeStats, check_vocab

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
    """Devices the batch is split over (its data and fsdp axes): batch sizes round up to it."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in shd.DEFAULT_RULES["batch"]]))


def rows_per_batch(batch_size: int, mesh=None) -> int:
    """Decoding slots: `batch_size` rounded up to a multiple of the mesh's batch shards."""
    shards = _batch_shards(mesh)
    return -(-max(1, int(batch_size)) // shards) * shards


def _params_on_mesh(params, cfg: ModelConfig, mesh):
    """Params as they are if already on `mesh`, else placed by the logical rules (LoRA: replicated)."""
    leaves = jax.tree.leaves(params)
    if all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
           for x in leaves):
        return params

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
    """A host array as a global array sharded by logical `axes` (replicated if none)."""
    if mesh is None:
        return jnp.asarray(x)
    if not axes:
        return shd.put_global(x, NamedSharding(mesh, PartitionSpec()))
    return shd.put(np.asarray(x), axes, mesh)


def _to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-process) global array on every host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- sampling

def iter_sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                eos_ids: Sequence[int] = (), seed: int = 0, batch_size: int = 8, mesh=None,
                row_ids: Sequence[int | str] | None = None, pad_id: int = 0,
                prompt_buckets: Sequence[int] | None = None, start_row: int = 0,
                progress: bool = False, sync_every: int = 32, desc: str = "generate",
                continuous: bool = True, min_refill: int | None = None, draft=None, draft_tokens: int = 4,
                stats: SpeculativeStats | None = None) -> Iterator[tuple[list[int], list[Result]]]:
    """Yield (row indices, results) in row order, as soon as each run of rows is complete
    (see `sample` for the arguments). `start_row` skips the first rows without computing them.
    """
    params, cfg, cdt = model_parts(model)
    if draft is not None:
        dparams, dcfg, ddt = model_parts(draft)
        check_vocab(cfg, dcfg)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if sync_every <= 0:
        raise ValueError(f"sync_every must be positive, got {sync_every}")
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise ValueError(f"prompt {i} is empty")
        vocab = cfg.vocab_size if draft is None else min(cfg.vocab_size, dcfg.vocab_size)
        if p.min() < 0 or p.max() >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    limits = _row_limits(max_new_tokens, len(prompts))
    ids_of_rows = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(ids_of_rows) != len(prompts):
        raise ValueError(f"{len(ids_of_rows)} row_ids for {len(prompts)} prompts")
    if mesh is not None and mesh.size == 1:
        mesh = None  # nothing to shard
    S = rows_per_batch(batch_size, mesh)
    if mesh is not None:
        params = _params_on_mesh(params, cfg, mesh)
    static = dict(sampling=sampling, pad_id=int(pad_id), compute_dtype=cdt, mesh=mesh)
    if draft is None:
        engine = PlainEngine(params, cfg, static)
    else:
        if mesh is not None:
            dparams = _params_on_mesh(dparams, dcfg, mesh)
        engine = SpeculativeEngine(params, cfg, dparams, dcfg, static, draft_tokens=draft_tokens, draft_dtype=ddt,
                                   stats=stats)
    order = list(range(max(0, start_row), len(prompts)))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), initial=len(prompts) - len(order), desc=desc, unit="prompt",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    finished_tokens, t_start = 0, time.perf_counter()

    def on_sync(in_flight: int) -> None:
        if progress:
            rate = (finished_tokens + in_flight) / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=True)

    pending: dict[int, Result] = {}
    emit = order[0] if order else 0
    try:
        for r, tokens, stopped in run_slots(
                params, cfg, prompts, order, slots=S, shards=_batch_shards(mesh), limits=limits,
                seeds=[row_seed(i) for i in ids_of_rows], key=_put(jax.random.key(int(seed)), (), mesh),
                stops=_put(stop_id_array(eos_ids), (), mesh), static=static,
                bucket=lambda n: bucket_length(n, prompt_buckets), pad_id=int(pad_id),
                put=lambda x, axes: _put(x, axes, mesh), to_host=_to_host, continuous=continuous,
                min_refill=min_refill, sync_every=sync_every, on_sync=on_sync, engine=engine):
            pending[r] = Result(tokens=tokens.tolist(), finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
                                prompt_tokens=int(prompts[r].size), new_tokens=int(tokens.size))
            finished_tokens += int(tokens.size)
            bar.update(1)
            ready = []
            while emit in pending:
                ready.append(emit)
                emit += 1
            if ready:
                yield ready, [pending.pop(i) for i in ready]
    finally:
        bar.close()


def _row_limits(max_new_tokens, n: int) -> list[int]:
    """Per-row max new tokens from one int or one int per prompt (each must be positive)."""
    if isinstance(max_new_tokens, (int, np.integer)):
        limits = [int(max_new_tokens)] * n
    else:
        limits = [int(x) for x in max_new_tokens]
        if len(limits) != n:
            raise ValueError(f"{len(limits)} max_new_tokens values for {n} prompts")
    bad = [i for i, x in enumerate(limits) if x <= 0]
    if bad:
        raise ValueError(f"max_new_tokens must be positive, got {limits[bad[0]]} (row {bad[0]})")
    return limits


def sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           eos_ids: Sequence[int] = (), seed: int = 0, batch_size: int = 8, mesh=None,
           row_ids: Sequence[int | str] | None = None, pad_id: int = 0,
           prompt_buckets: Sequence[int] | None = None, progress: bool = False,
           sync_every: int = 32, continuous: bool = True, min_refill: int | None = None, draft=None,
           draft_tokens: int = 4, stats: SpeculativeStats | None = None) -> list[Result]:
    """Generate a continuation of every prompt (token id lists); one `Result` per prompt, in order.

    model: a `models.Decoder` or a `(params, ModelConfig)` pair (e.g. the student's current
    params during training). temperature 0 = greedy; top_k 0 / top_p 1.0 = off (applied in the
    order temperature, top-k, top-p). eos_ids: ids that end a row (kept as its last token).
    seed + row_ids (default: the prompt's index; strings are hashed) fix each row's random
    stream, independent of batching. mesh: shard the batch over its data/fsdp axes (params are
    placed by the logical rules unless already on the mesh). pad_id only fills padding.
    max_new_tokens: one limit for all rows or one per prompt. batch_size: decoding slots (rounded
    up to a multiple of the mesh's batch shards). continuous: refill finished slots with the next
    prompts while the others decode (False: static batches of consecutive rows); min_refill:
    slots that must be free before a refill (default `max(batch shards, slots // 8)`).
    sync_every: decode steps between host checks (progress bar, collecting finished rows).
    draft: a smaller model (same forms as `model`, the same vocabulary) for speculative decoding
    with `draft_tokens` drafted tokens per round (`sampling.speculative`; sync_every then counts
    rounds); stats: a `sampling.speculative.SpeculativeStats` that receives the run's acceptance
    and tokens per target forward.
    """
    out: list[Result] = []
    for _, results in iter_sample(model, prompt_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  eos_ids=eos_ids, seed=seed, batch_size=batch_size, mesh=mesh,
                                  row_ids=row_ids, pad_id=pad_id, prompt_buckets=prompt_buckets,
                                  progress=progress, sync_every=sync_every, continuous=continuous,
                                  min_refill=min_refill, draft=draft, draft_tokens=draft_tokens, stats=stats):
        out.extend(results)
    return out
