"""The demo's fixed parts: a byte-level tokenizer with a ChatML template, the teacher and
student architectures (Qwen2 family), and the packaged teacher weights.

The tokenizer has no merges: every UTF-8 byte is one token. Decoding a response and encoding
it again therefore gives back the same ids, so responses survive the text round trip between
generation and training exactly (with a merging BPE, sampled token sequences that are not the
canonical encoding of their text would be re-tokenised differently).

    0  <|endoftext|>   pad
    1  <|im_start|>    ChatML turn start
    2  <|im_end|>      end of turn and eos
    3..258             the 256 bytes
"""
from __future__ import annotations

import os
from pathlib import Path

PAD_ID, IM_START_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
# ChatML without a default system turn (short prompts keep the demo fast).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_COMMON = dict(model_type="qwen2", vocab_size=VOCAB_SIZE, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
               bos_token_id=None, max_position_embeddings=256, rope_theta=10000.0, initializer_range=0.02,
               rms_norm_eps=1e-6)
# About 1.7M parameters (3.4 MB in bfloat16): large enough to learn the task well.
TEACHER_CONFIG = dict(_COMMON, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
# About 0.43M parameters: learns the task only partly from a short supervised warm-up.
STUDENT_CONFIG = dict(_COMMON, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

TEACHER_DIR = Path(__file__).parent / "teacher"


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """The byte-level demo tokenizer (a PreTrainedTokenizerFast); saved to `out_dir` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"], model_max_length=256,
                                 chat_template=CHAT_TEMPLATE)
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [PAD_ID, IM_START_ID, EOS_ID]
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def _byte_of(char: str) -> int:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}[char]


def has_packaged_teacher() -> bool:
    return (TEACHER_DIR / "config.json").is_file() and (TEACHER_DIR / "model.safetensors").is_file()
