"""The tiny tokenizer for tests: the builder lives in `distillm2_jax.toy`; fixtures here.

Fixtures (import them into a test module to use them): `tiny_tokenizer_dir` (session-scoped
folder) and `tiny_tokenizer` (session-scoped tokenizer loaded from it with AutoTokenizer).
"""
from __future__ import annotations

import pytest

from distillm2_jax.toy import (  # noqa: F401  (re-exported for tests)
    BOS_CHATML_TEMPLATE,
    BOS_ID,
    CHATML_TEMPLATE,
    DEFAULT_SYSTEM,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder holding the default tiny tokenizer (ChatML template, no BOS)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The default tiny tokenizer, loaded from its folder the way the product loads one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
