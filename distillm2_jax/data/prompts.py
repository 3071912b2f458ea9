"""Templated prompts for generation: source spec + tokenizer -> prompt token ids.

The generator's entry point is `load_templated_prompts(spec, tokenizer, max_prompt_length=...)`
(or `template_prompts(load_prompts(spec), tokenizer, ...)`), giving one `TemplatedPrompt` per
source record, in source order, each with a stable id and int32 token ids whose END is kept.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from distillm2_jax.data.chat import encode_prompts
from distillm2_jax.data.messages import Message
from distillm2_jax.data.sources import PromptRecord, load_prompts


@dataclasses.dataclass(frozen=True)
class TemplatedPrompt:
    """A prompt ready for the sampler.

    id / index / prompt / messages / key: as in `PromptRecord` (write `prompt` and `id` back into
    the generation output). text: the rendered chat-template string. input_ids: int32 [n] token
    ids, n <= max_prompt_length. num_truncated: tokens cut from the front (0 if none).
    """

    id: str
    index: int
    prompt: str | list[Message]
    messages: list[Message]
    key: str
    text: str
    input_ids: np.ndarray
    num_truncated: int


def template_prompts(records: Sequence[PromptRecord], tokenizer, *,
                     max_prompt_length: int | None = None, plain_fallback: bool = False,
                     sanitize_control_tokens: bool = False) -> list[TemplatedPrompt]:
    """Render every prompt with the tokenizer's chat template and encode it (keeping the END)."""
    encoded = encode_prompts(
        tokenizer, [r.messages for r in records], max_prompt_length=max_prompt_length,
        plain_fallback=plain_fallback, sanitize_control_tokens=sanitize_control_tokens,
        wheres=[r.where for r in records])
    return [
        TemplatedPrompt(id=r.id, index=r.index, prompt=r.prompt, messages=r.messages, key=r.key,
                        text=e.text, input_ids=e.input_ids, num_truncated=e.num_truncated)
        for r, e in zip(records, encoded)
    ]


def load_templated_prompts(spec: str, tokenizer, *, max_prompt_length: int | None = None,
                           field: str | None = None, limit: int | None = None,
                           plain_fallback: bool = False,
                           sanitize_control_tokens: bool = False) -> list[TemplatedPrompt]:
    """`load_prompts(spec)` then `template_prompts(...)`: what `distillm2 generate` calls."""
    return template_prompts(load_prompts(spec, field=field, limit=limit), tokenizer,
                            max_prompt_length=max_prompt_length, plain_fallback=plain_fallback,
                            sanitize_control_tokens=sanitize_control_tokens)
