"""Sample continuations of token-id prompts in fixed batches with the compiled JAX sampler.

`iter_sample` splits the prompts into batches of a fixed size in the given order (the last
batch padded with dummy rows), left-pads each batch to a length bucket (powers of two from 16),
and runs the compiled prefill + decode loop of `distillm2_jax.sampling`, syncing with the host
every `sync_every` steps for the progress bar and to stop early once every row is done. So a run
compiles one program per prompt-length bucket, whatever the number of prompts, and each row's
random stream depends only on (seed, row id), never on how rows were batched.
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
from distillm2_jax.sampling.decode import (
    SamplingConfig,
    decode,
    prefill,
    stop_id_array,
    unstack_layers_jit,
)

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
    """Rows in each batch: `batch_size` rounded up to a multiple of the mesh's batch shards.

    Batch b of `iter_sample` holds rows [b * B, (b + 1) * B) for this B.
    """
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

def iter_sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                eos_ids: Sequence[int] = (), seed: int = 0, batch_size: int = 8, mesh=None,
                row_ids: Sequence[int | str] | None = None, pad_id: int = 0,
                prompt_buckets: Sequence[int] | None = None, start_batch: int = 0,
                progress: bool = False, sync_every: int = 32, desc: str = "generate"
                ) -> Iterator[tuple[list[int], list[Result]]]:
    """Yield (row indices, results) batch by batch, in order (see `sample` for the arguments).

    Batch b holds rows [b * B, (b + 1) * B) (B = `rows_per_batch(batch_size, mesh)`);
    `start_batch` skips the first batches without computing them.
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
    B = rows_per_batch(batch_size, mesh)
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
