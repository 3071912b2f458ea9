"""A grain loader of tokenised pair batches: shuffle per epoch, shard per process, checkpointable.

Pipeline (grain.MapDataset, random access end to end):

    source (Pairs or TokenizedPairs) -> shuffle(epoch_seed(seed, epoch))
      -> this process's slice of every global batch -> map(tokenise) -> batch(collate)

- Shuffling is a pure function of (seed, epoch): same seed and epoch give the same order on
  every host and every restart; another epoch gives another order. DistiLLM-2 regenerates the
  student responses every epoch, so a loader covers ONE epoch of one pair file; build the next
  epoch's loader with `epoch=e+1`.
- Sharding: global batch k holds shuffled positions [k*G, (k+1)*G). Process p of P gets the
  contiguous rows [p*G/P, (p+1)*G/P) of it, so the union over processes, in process order, IS
  the single-process global batch (feed it with jax.make_array_from_process_local_data).
  layout="shared_prompt" (the trainer's) stores each prompt once ([G/P, P] prompts, [G/P, 2, R]
  responses, pairs on axis 0; `batches.collate_shared_prompts`): per-host pieces concatenate
  along axis 0; responses then keep at most max_length - max_prompt_length tokens. The "rows"
  layout ([chosen; rejected] row blocks, for evaluation) does not concatenate that way.
- drop_remainder=True drops the last partial global batch; False pads it with filler pairs
  (valid=0, all labels -100) so every host still sees full, equal shapes.
- State: `iter(loader)` is a grain DatasetIterator: `get_state()` / `set_state(state)` restore
  the position exactly, and Orbax saves it with `grain.checkpoint.CheckpointSave(iterator)` /
  `CheckpointRestore(iterator)` (handler `grain.checkpoint.CheckpointHandler`, one JSON file
  per process).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import grain
import numpy as np

from distillm2_jax.data.batches import LAYOUTS, PairTokenizer, collate_fn, max_response_length
from distillm2_jax.data.pairs import Pair
from distillm2_jax.data.tokenized import EMPTY_PAIR, TokenizedPair
from distillm2_jax.errors import UserError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit shuffle seed derived from (seed, epoch); distinct pairs give unrelated orders."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint32)[0])


class _Filler:
    """Marks a padding position of the last global batch (never None: grain drops None)."""


class _ProcessSliceMapDataset(grain.MapDataset):
    """This process's contiguous slice of every global batch (plus filler past the end)."""

    def __init__(self, parent: grain.MapDataset, *, global_batch_size: int, process_index: int,
                 process_count: int, drop_remainder: bool):
        super().__init__(parent)
        self._g = global_batch_size
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        n = len(parent)
        self._n = n
        self._batches = n // self._g if drop_remainder else math.ceil(n / self._g)

    def __len__(self) -> int:
        return self._batches * self._local

    def __str__(self) -> str:
        return "ProcessSliceMapDataset"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = index % len(self)
        k, j = divmod(index, self._local)
        g = k * self._g + self._offset + j
        return self._parent[g] if g < self._n else _Filler()


def _to_tokenized(item, pair_tokenizer: PairTokenizer) -> TokenizedPair:
    if isinstance(item, _Filler):
        return EMPTY_PAIR
    if isinstance(item, TokenizedPair):
        return pair_tokenizer.retruncate(item)
    if isinstance(item, Pair):
        return pair_tokenizer(item)
    raise TypeError(f"pair loader items must be Pair or TokenizedPair, got {type(item).__name__}")


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


class PairLoader:
    """One epoch of [chosen; rejected] batches for this process (see the module docstring).

    `pairs`: a sequence of `Pair` (from `read_pairs`; responses use their stored token ids where
    the tokenizer's fingerprint matches, see `batches.PairTokenizer`) or `TokenizedPair` (e.g. a
    `tfds_io.TokenizedPairSource`); `global_batch_size` counts PAIRS over all processes, each
    process gets `global_batch_size // process_count` pairs = twice as many rows per batch.
    `ids_checked`: the pairs' stored ids were already checked (`batches.check_stored_ids`).
    """

    def __init__(self, pairs: Sequence, tokenizer, *, global_batch_size: int, max_length: int,
                 max_prompt_length: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 drop_remainder: bool = True, length_buckets: Sequence[int] | None = None,
                 layout: str = "rows", plain_fallback: bool = False, num_threads: int = 4,
                 prefetch_buffer_size: int = 8, ids_checked: bool = False):
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        if global_batch_size <= 0 or global_batch_size % self.process_count:
            raise UserError(f"global_batch_size {global_batch_size} must be a positive multiple "
                            f"of the process count {self.process_count}")
        if layout not in LAYOUTS:
            raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if length_buckets and self.process_count > 1:
            raise UserError("length_buckets needs a single process: hosts would pick different "
                            "shapes for one global batch")
        if drop_remainder and len(pairs) < global_batch_size:
            raise UserError(f"{len(pairs)} pairs is fewer than one global batch "
                            f"({global_batch_size}); lower the batch size or use drop_remainder=False")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // self.process_count
        self.seed, self.epoch = seed, epoch
        self.pair_tokenizer = PairTokenizer(
            tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
            plain_fallback=plain_fallback, ids_checked=ids_checked,
            max_response_length=max_response_length(layout, max_length, max_prompt_length))
        ds = grain.MapDataset.source(pairs)
        if shuffle:
            ds = ds.shuffle(seed=epoch_seed(seed, epoch))
        ds = _ProcessSliceMapDataset(ds, global_batch_size=global_batch_size,
                                     process_index=self.process_index,
                                     process_count=self.process_count,
                                     drop_remainder=drop_remainder)
        ds = ds.map(partial(_to_tokenized, pair_tokenizer=self.pair_tokenizer))
        collate = collate_fn(layout, max_length=max_length, max_prompt_length=max_prompt_length,
                             pad_id=self.pair_tokenizer.pad_id, length_buckets=length_buckets)
        self.dataset: grain.MapDataset = ds.batch(self.local_batch_size, drop_remainder=True,
                                                  batch_fn=collate)
        self._read_options = grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch_buffer_size)

    def __len__(self) -> int:
        """Batches in this epoch (the same on every process)."""
        return len(self.dataset)

    def __iter__(self) -> grain.DatasetIterator:
        return self.iterator()

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        """A fresh grain iterator, optionally positioned by a saved `get_state()`."""
        it = self.dataset.to_iter_dataset(self._read_options).__iter__()
        if state is not None:
            it.set_state(state)
        return it
