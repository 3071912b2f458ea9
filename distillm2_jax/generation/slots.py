"""The host side of continuous batching: which row goes into which slot, and when.

`run_slots` keeps S slots of the compiled sampler (`sampling.decode`) busy: it prefills the
next prompts into free slots (`insert`), lets every slot decode (`decode`) until enough slots
have finished (or `sync_every` steps pass), collects the finished rows and refills their
slots, until every row is done. With `continuous=False` it only refills once every slot is
free: static batches of S consecutive rows, each decoded until its longest row ends.

Same numbers whatever the schedule: a row is prefilled in a group of `shards` rows (the mesh's
batch shards, padding rows dropped) that share its own prompt-length bucket, so its prompt
sits at the same cache slots with the same shapes wherever and whenever it is inserted; the
slots, the cache length and the new-token room are fixed by all the prompts and limits of the
run (not only those left to do). So a row's tokens, in the last bit, do not depend on which
rows decode beside it, on `continuous` or `min_refill`, or on where a resumed run starts.

Bounded compilation: one `decode` program per run and one `insert` program per prompt bucket.
The programs come from an engine: `PlainEngine` (the sampler of `sampling.decode`) or
`sampling.speculative.SpeculativeEngine` (a draft model proposes, the model verifies).
Every process of a multi-process run sees the same host arrays (`to_host` gathers them) and
so makes the same decisions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from distillm2_jax.sampling.decode import decode, empty_state, insert


class PlainEngine:
    """The plain sampler's programs (`sampling.decode`) on one model; `static`: their static args."""

    def __init__(self, params, cfg, static: dict):
        self.params, self.cfg, self.static = params, cfg, static

    def empty(self, *, slots: int, cache_length: int, max_new_tokens: int, pad_id: int):
        return empty_state(self.cfg, slots=slots, cache_length=cache_length, max_new_tokens=max_new_tokens,
                           pad_id=pad_id, compute_dtype=self.static["compute_dtype"], record_logits=False,
                           mesh=self.static["mesh"])

    def insert(self, state, ids, mask, dest, key, row_ids, limits, stops):
        return insert(self.params, self.cfg, state, ids, mask, dest, key, row_ids, limits, stops, **self.static)

    def decode(self, state, stops, max_steps, min_free):
        return decode(self.params, self.cfg, state, stops, max_steps, min_free, **self.static)

    def finish(self, state, to_host) -> None:
        """Called with the run's last state (nothing to collect here)."""


def insert_groups(rows: Sequence[int], buckets: Sequence[int], size: int) -> list[list[int]]:
    """`rows` split into groups of at most `size` rows of one prompt bucket each (buckets[i] is
    row rows[i]'s), in the order of each bucket's first row."""
    by_bucket: dict[int, list[int]] = {}
    for r, b in zip(rows, buckets):
        by_bucket.setdefault(b, []).append(r)
    return [group[i:i + size] for group in by_bucket.values() for i in range(0, len(group), size)]


def run_slots(params, cfg, prompts: Sequence[np.ndarray], order: Sequence[int], *, slots: int,
              shards: int, limits: Sequence[int], seeds: Sequence[int], key, stops, static: dict,
              bucket: Callable[[int], int], pad_id: int, put: Callable, to_host: Callable,
              continuous: bool = True, min_refill: int | None = None, sync_every: int = 32,
              on_sync: Callable[[int], None] | None = None, engine=None
              ) -> Iterator[tuple[int, np.ndarray, bool]]:
    """Yield (row, new tokens, stopped) for every row of `order` as it finishes (any order).

    prompts[r] / limits[r] / seeds[r]: row r's prompt ids, max new tokens and uint32 RNG id.
    bucket(n): the padded prompt length for a longest prompt of n tokens. put(host array,
    logical axes) places an input on the mesh; to_host(global array) reads one back.
    min_refill: decode until this many slots are free before refilling (default: the batch
    shards, at least slots // 8); on_sync(new tokens so far) is called after each decode call.
    engine: the sampler's programs (default `PlainEngine(params, cfg, static)`); its `decode`
    steps are speculative rounds for a `SpeculativeEngine`.
    """
    engine = engine or PlainEngine(params, cfg, static)
    S = slots
    todo = list(order)
    if not todo:
        return
    N = max(int(x) for x in limits)                      # all rows, not only those to do:
    C = bucket(max(p.size for p in prompts)) + N          # a resumed run keeps the shapes
    threshold = max(1, min(S, min_refill or max(shards, S // 8)))
    state = engine.empty(slots=S, cache_length=C, max_new_tokens=N, pad_id=pad_id)
    slot_row = [-1] * S
    next_i = 0
    while True:
        free = [s for s in range(S) if slot_row[s] < 0]
        if next_i < len(todo) and free and (continuous or len(free) == S):
            rows = todo[next_i:next_i + len(free)]
            next_i += len(rows)
            for group in insert_groups(rows, [bucket(prompts[r].size) for r in rows], shards):
                dest, free = free[:len(group)], free[len(group):]
                state = _insert_group(engine, state, prompts, group, dest, limits, seeds, key, stops,
                                      S=S, k=shards, P=bucket(prompts[group[0]].size), pad_id=pad_id,
                                      put=put)
                for s, r in zip(dest, group):
                    slot_row[s] = r
        if all(r < 0 for r in slot_row):
            engine.finish(state, to_host)
            return
        waiting = len(todo) - next_i
        # every slot is busy here (or there is nothing left to refill it with): stop decoding
        # once enough are free to refill; static batches decode until all are done
        min_free = min(threshold, waiting) if waiting and continuous else S + 1
        state = engine.decode(state, stops, jnp.int32(sync_every), jnp.int32(min_free))
        done, num_new = to_host(state.done), to_host(state.num_new)
        finished = [s for s in range(S) if slot_row[s] >= 0 and done[s]]
        if on_sync is not None:
            on_sync(int(sum(num_new[s] for s in range(S) if slot_row[s] >= 0)))
        if finished:
            tokens, stopped = to_host(state.tokens), to_host(state.stopped)
            for s in finished:
                yield slot_row[s], tokens[s, :num_new[s]], bool(stopped[s])
                slot_row[s] = -1


def _insert_group(engine, state, prompts, rows, free, limits, seeds, key, stops, *,
                  S: int, k: int, P: int, pad_id: int, put):
    """`insert` rows into the slots `free`, as one group of k rows left-padded to P tokens."""
    ids = np.full((k, P), pad_id, np.int32)
    mask = np.zeros((k, P), bool)
    dest = np.full((k,), S, np.int32)          # padding rows: dropped
    lim = np.ones((k,), np.int32)
    rid = np.zeros((k,), np.uint32)
    for j, (s, r) in enumerate(zip(free, rows)):
        n = prompts[r].size
        ids[j, P - n:] = prompts[r]
        mask[j, P - n:] = True
        dest[j], lim[j], rid[j] = s, limits[r], seeds[r]
    mask[len(rows):, -1] = True  # padding rows: one pad token
    return engine.insert(state, put(ids, ("batch", "length")), put(mask, ("batch", "length")),
                         put(dest, ("batch",)), key, put(rid, ("batch",)), put(lim, ("batch",)), stops)
