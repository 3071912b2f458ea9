"""A toy setup that needs no download: a tiny byte-level BPE tokenizer with a ChatML template,
a tiny teacher and student of the Qwen2 family that share it, and a prompt file.

Used by the quickstart (a complete distillation run in about a minute on a laptop CPU) and by
the tests. The tokenizer's special-token ids are stable:

    0  <|endoftext|>      pad_token (PAD_ID)
    1  <|im_start|>       ChatML turn start
    2  <|im_end|>         eos_token (EOS_ID) and the end-of-turn token of the template
    3  <|begin_of_text|>  bos_token only in the `bos=True` variant (BOS_ID)
    4..259                the 256 byte symbols; merges follow up to VOCAB_SIZE (= 400) ids
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from distillm2_jax import models
from distillm2_jax.hf import save_pretrained

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


TOY_WORDS = ("red", "blue", "green", "cat", "dog", "bird", "one", "two", "three", "sort", "list", "sum")


def build_toy_models(root: str | os.PathLike, *, seed: int = 0) -> dict[str, Path]:
    """Tokenizer, a 2-layer teacher (hidden 64) and a 2-layer student (hidden 32) under `root`."""

    root = Path(root)
    tok = build_tiny_tokenizer(root / "tokenizer")
    common = dict(model_type="qwen2", vocab_size=VOCAB_SIZE, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None,
                  max_position_embeddings=512, initializer_range=0.1)
    # A larger init scale gives the teacher a sharp, far-from-uniform next-token distribution,
    # so distillation has something to transfer even without training the teacher.
    teacher = models.from_config(dict(common, hidden_size=64, intermediate_size=128, initializer_range=0.5),
                                 seed=seed)
    student = models.from_config(dict(common, hidden_size=32, intermediate_size=64, tie_word_embeddings=True),
                                 seed=seed + 1)
    out = {"tokenizer": root / "tokenizer", "teacher": root / "teacher", "student": root / "student"}
    save_pretrained(teacher, out["teacher"], tokenizer=tok)
    save_pretrained(student, out["student"], tokenizer=tok)
    return out


def write_toy_prompts(path: str | os.PathLike, n: int, *, seed: int = 0) -> Path:
    """n short prompts as JSONL (`{"prompt": ...}`), deterministic in `seed`."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(TOY_WORDS) for _ in range(3))
            f.write(json.dumps({"prompt": f"{words} {i}"}) + "\n")
    return path
