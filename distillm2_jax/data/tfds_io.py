"""TFDS array_record datasets without TensorFlow: write (adhoc builder) and read (data_source).

Large runs tokenise pairs once, store them as an array_record TFDS dataset and let grain read
them with random access (`tfds.data_source`), so no host re-tokenises per epoch and no
TensorFlow is needed. Writing subclasses tfds' `AdhocBuilder` and overrides
`_split_generators` to yield from plain Python iterables (the stock one probes tf.data).
tfds needs `importlib_resources` installed (a packaging gap of tensorflow-datasets).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from distillm2_jax.data.tokenized import TokenizedPair
from distillm2_jax.errors import UserError

TOKENIZED_PAIRS_NAME = "distillm2_pairs"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # e.g. importlib_resources missing
        raise UserError(f"tensorflow-datasets is not usable here ({err}); "
                        "pip install tensorflow-datasets importlib_resources") from None
    return tfds


def data_source(name: str, *, split: str = "train", data_dir: str | None = None):
    """Random-access `tfds.data_source` over an array_record dataset; never downloads."""
    tfds = _tfds()
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # DatasetNotFoundError, unknown split, non-array_record format
        where = f"tfds:{name}:{split}" + (f"@{data_dir}" if data_dir else "")
        raise UserError(f"{where}: cannot open as an array_record TFDS dataset: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def write_array_record_dataset(name: str, data_dir: str, features, splits: Mapping[str, Iterable[dict]],
                               *, version: str = "1.0.0", description: str | None = None,
                               overwrite: bool = False) -> str:
    """Write `splits` ({split: iterable of example dicts}) as an array_record TFDS dataset.

    Examples keep their order (shuffling at write time is disabled; loaders shuffle). Returns
    the dataset version folder. An existing one is an error unless `overwrite` (tfds would
    otherwise silently reuse the old data).
    """
    tfds = _tfds()
    from tensorflow_datasets.core.dataset_builders import adhoc_builder

    class _Builder(adhoc_builder.AdhocBuilder, skip_registration=True):
        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: ((i, ex) for i, ex in enumerate(examples))
                    for split, examples in self._split_datasets.items()}

    target = os.path.join(data_dir, name, version)
    if os.path.exists(target):
        if not overwrite:
            raise UserError(f"{target}: dataset already exists (pass overwrite=True to replace it)")
        shutil.rmtree(target)
    builder = _Builder(name=name, version=version, features=features, split_datasets=dict(splits),
                       data_dir=data_dir, description=description, file_format="array_record",
                       disable_shuffling=True)
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return target


def tokenized_pair_features():
    """TFDS features of a tokenised pair: variable-length int32 id lists + source index."""
    tfds = _tfds()
    seq = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
    return tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(dtype=np.int64),
        "prompt_ids": seq(),
        "chosen_ids": seq(),
        "rejected_ids": seq(),
    })


def export_tokenized_pairs(pairs: Sequence, data_dir: str, *, name: str = TOKENIZED_PAIRS_NAME,
                           split: str = "train", version: str = "1.0.0",
                           overwrite: bool = False) -> str:
    """Store `TokenizedPair`s (see batches.PairTokenizer) as an array_record TFDS dataset."""
    examples = ({"index": i, "prompt_ids": np.asarray(p.prompt_ids, np.int32),
                 "chosen_ids": np.asarray(p.chosen_ids, np.int32),
                 "rejected_ids": np.asarray(p.rejected_ids, np.int32)}
                for i, p in enumerate(pairs))
    return write_array_record_dataset(
        name, data_dir, tokenized_pair_features(), {split: examples}, version=version,
        description="DistiLLM-2 tokenised pairs (prompt / chosen / rejected token ids)",
        overwrite=overwrite)


class TokenizedPairSource(Sequence):
    """Random access to an exported tokenised-pair dataset, yielding `TokenizedPair`s.

    A plain sequence, so `grain.MapDataset.source(...)` (and the pair loader) can read it.
    """

    def __init__(self, data_dir: str, *, name: str = TOKENIZED_PAIRS_NAME, split: str = "train"):
        self._src = data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, index: Any):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        rec = self._src[index]
        return TokenizedPair(np.asarray(rec["prompt_ids"], np.int32),
                             np.asarray(rec["chosen_ids"], np.int32),
                             np.asarray(rec["rejected_ids"], np.int32))
