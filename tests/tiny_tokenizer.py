"""A tiny offline byte-level BPE tokenizer with a ChatML (Qwen2-like) chat template, for tests.

Shared by the data, model and generation tests, so its API and token ids are stable:

    build_tiny_tokenizer(out_dir, *, bos=False, chat_template=True) -> PreTrainedTokenizerFast

trains a byte-level BPE on a fixed built-in corpus (deterministic, ~10 ms), wraps it in
`PreTrainedTokenizerFast` and `save_pretrained`s it to `out_dir`, so tests can also load it with
`AutoTokenizer.from_pretrained(out_dir)` exactly as the product loads a real model's tokenizer.

Special-token ids (identical in every variant):

    0  <|endoftext|>      pad_token (PAD_ID)
    1  <|im_start|>       ChatML turn start
    2  <|im_end|>         eos_token (EOS_ID) and the end-of-turn token of the template
    3  <|begin_of_text|>  bos_token only in the `bos=True` variant (BOS_ID)
    4..259                the 256 byte symbols; merges follow up to VOCAB_SIZE (= 400) ids

Variants: `bos=True` gives a Llama-like tokenizer whose template starts with `{{ bos_token }}` AND
whose post-processor adds BOS on `encode(...)` (the classic double-BOS trap);
`chat_template=False` gives a tokenizer with no chat template at all.

Fixtures (import them into a test module to use them): `tiny_tokenizer_dir` (session-scoped
folder) and `tiny_tokenizer` (session-scoped tokenizer loaded from it with AutoTokenizer).
"""
from __future__ import annotations

import os

import pytest

PAD_ID = 0
IM_START_ID = 1
EOS_ID = 2
IM_END_ID = 2
BOS_ID = 3
VOCAB_SIZE = 400
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
DEFAULT_SYSTEM = "You are a helpful assistant."

# ChatML like Qwen2: a default system turn when the conversation has none, every turn closed by
# <|im_end|>\n, and `<|im_start|>assistant\n` as the generation prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BOS_CHATML_TEMPLATE = "{{- bos_token }}" + CHATML_TEMPLATE

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "hello world how are you today I am fine thank you very much please write short poem "
    "about sea sun moon stars river mountain explain why sky is blue answer question "
    "what is two plus three equals five number math code python function return value "
    "user assistant system model teacher student prompt response chosen rejected good bad "
    "Sure! Here is an answer: first, second, third; finally (done). Yes, no? maybe..."
).split()


def _corpus() -> list[str]:
    # Deterministic pseudo-random sentences (a fixed LCG, no global RNG state touched).
    lines, state = [], 12345
    for _ in range(400):
        words = []
        for _ in range(12):
            state = (1103515245 * state + 12345) % (2**31)
            words.append(_WORDS[state % len(_WORDS)])
        lines.append(" ".join(words) + ("\n" if state % 3 == 0 else " ") + str(state % 1000))
    return lines


def build_tiny_tokenizer(out_dir, *, bos: bool = False, chat_template: bool = True):
    """Train, wrap and save the tiny tokenizer to `out_dir`; returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", BOS_ID)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096)
    if bos:
        kwargs["bos_token"] = "<|begin_of_text|>"
    if chat_template:
        kwargs["chat_template"] = BOS_CHATML_TEMPLATE if bos else CHATML_TEMPLATE
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [PAD_ID, IM_START_ID, EOS_ID, BOS_ID]
    return hf


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
