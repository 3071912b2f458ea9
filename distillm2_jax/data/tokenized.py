"""The token ids of one pair after truncation: made by `batches.PairTokenizer`, stored and read
back by `tfds_io`, collated by `batches`. Kept apart so that the TFDS reader, which the record
readers use, need not import the batching code."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair, already truncated: prompt, and each response incl. end-of-turn."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    valid: bool = True


EMPTY_PAIR = TokenizedPair(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                           valid=False)
