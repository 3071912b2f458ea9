"""Chat templating and encoding with a Hugging Face tokenizer (loaded from a local folder).

Rules (docs/data.md, "Chat templating"):
- A prompt is rendered with `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)` and encoded with `add_special_tokens=False`: the template already writes every
  special token it wants (BOS included), so letting the tokenizer add BOS again would give a
  double BOS (Llama/Gemma-style tokenizers). A leading [BOS, BOS] is collapsed as a safeguard.
- Long prompts keep their END (`max_prompt_length`); a leading BOS is kept in front.
- A response is `encode(text) + [end_of_turn]`, where end_of_turn is the token the template writes
  right after an assistant message (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, Gemma
  `<end_of_turn>`), falling back to `eos_token`. This is what the model must learn to emit to stop.
- No chat template: `UserError`, unless `plain_fallback=True`, which renders the user text as is
  ("{prompt}"; several messages are joined by blank lines) preceded by bos_token if the tokenizer
  has one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from distillm2_jax.data.messages import Message
from distillm2_jax.errors import UserError

_SENTINEL = "QzxSentinelResponse42"


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (templated prompts are possible)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _require_template(tokenizer, plain_fallback: bool) -> bool:
    if has_chat_template(tokenizer):
        return True
    if plain_fallback:
        return False
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    raise UserError(
        f"{name} has no chat template; use an instruct model's tokenizer, add a `chat_template` "
        "to its tokenizer_config.json / chat_template.jinja, or pass the plain-prompt fallback "
        "option (renders the prompt text as is)"
    )


def render_prompt(tokenizer, messages: list[Message], *, plain_fallback: bool = False,
                  where: str = "") -> str:
    """The templated prompt string (with the generation prompt), as the model will see it."""
    if not _require_template(tokenizer, plain_fallback):
        text = "\n\n".join(m["content"] for m in messages)
        bos = getattr(tokenizer, "bos_token", None)
        return (bos or "") + text
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja raise_exception(...) and friends: a data problem
        loc = f"{where}: " if where else ""
        raise UserError(f"{loc}the chat template rejected this prompt: {err}") from None


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encode texts WITHOUT adding special tokens (templates and callers place them)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_text(tokenizer, text: str) -> list[int]:
    """Encode one text without adding special tokens."""
    return encode_texts(tokenizer, [text])[0]


def dedupe_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """Collapse a leading [BOS, BOS] (a template and a tokenizer both adding it) to one BOS."""
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        i = 1
        while i < len(ids) and ids[i] == bos_id:
            i += 1
        return [bos_id] + list(ids[i:])
    return list(ids)


def truncate_keep_end(ids: Sequence[int], max_len: int | None, bos_id: int | None = None) -> list[int]:
    """Keep the last `max_len` tokens (the question sits at the end of a long prompt).

    If the sequence starts with BOS it stays first: result = [BOS] + last (max_len - 1) tokens.
    """
    ids = list(ids)
    if max_len is None or len(ids) <= max_len:
        return ids
    if max_len <= 0:
        return []
    if bos_id is not None and ids and ids[0] == bos_id and max_len > 1:
        return [bos_id] + ids[len(ids) - (max_len - 1):]
    return ids[len(ids) - max_len:]


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A templated prompt: the rendered text, its token ids (truncated) and how many were cut."""

    text: str
    input_ids: np.ndarray  # int32 [n]
    num_truncated: int


def encode_prompts(tokenizer, conversations: Sequence[list[Message]], *,
                   max_prompt_length: int | None = None, plain_fallback: bool = False,
                   sanitize_control_tokens: bool = False,
                   wheres: Sequence[str] | None = None) -> list[EncodedPrompt]:
    """Render and encode many prompts (batched tokenizer call); see the module rules.

    `sanitize_control_tokens=True` encodes special-token text that appears inside messages
    (e.g. a literal "<|im_end|>" in a user prompt) as plain text instead of as the control token
    (transformers' apply_chat_template option); the returned `text` is then only for display.
    """
    wheres = list(wheres) if wheres is not None else [""] * len(conversations)
    texts = [render_prompt(tokenizer, m, plain_fallback=plain_fallback, where=w)
             for m, w in zip(conversations, wheres)]
    if sanitize_control_tokens and has_chat_template(tokenizer):
        all_ids = [list(tokenizer.apply_chat_template(
            m, add_generation_prompt=True, tokenize=True, return_dict=False,
            sanitize_control_tokens=True)) for m in conversations]
    else:
        all_ids = encode_texts(tokenizer, texts)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    out = []
    for text, ids in zip(texts, all_ids):
        ids = dedupe_bos(ids, bos_id)
        kept = truncate_keep_end(ids, max_prompt_length, bos_id)
        out.append(EncodedPrompt(text, np.asarray(kept, dtype=np.int32), len(ids) - len(kept)))
    return out


def encode_prompt(tokenizer, messages: list[Message], *, max_prompt_length: int | None = None,
                  plain_fallback: bool = False, sanitize_control_tokens: bool = False,
                  where: str = "") -> EncodedPrompt:
    """Render and encode one prompt (see `encode_prompts`)."""
    return encode_prompts(tokenizer, [messages], max_prompt_length=max_prompt_length,
                          plain_fallback=plain_fallback,
                          sanitize_control_tokens=sanitize_control_tokens, wheres=[where])[0]


def _is_control_token(tokenizer, token_id: int) -> bool:
    if token_id in set(getattr(tokenizer, "all_special_ids", []) or []):
        return True
    return token_id in (getattr(tokenizer, "added_tokens_decoder", {}) or {})


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: appended to every response in training.

    Found by rendering [user, assistant=SENTINEL] and taking the first token after the sentinel
    if it is a special/added token (ChatML <|im_end|>, Llama-3 <|eot_id|>, Gemma <end_of_turn>);
    otherwise (or without a template) the tokenizer's eos_token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if has_chat_template(tokenizer):
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "ping"}, {"role": "assistant", "content": _SENTINEL}],
                tokenize=False)
        except Exception:  # a template that cannot render this: fall back to eos
            rendered = ""
        pos = rendered.find(_SENTINEL)
        if pos >= 0:
            after = encode_text(tokenizer, rendered[pos + len(_SENTINEL):])
            if after and _is_control_token(tokenizer, after[0]):
                return int(after[0])
    if eos is None:
        raise UserError("the tokenizer has no eos_token and its chat template shows no "
                        "end-of-turn token; set eos_token in tokenizer_config.json")
    return int(eos)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end generation: eos_token and the template's end-of-turn token."""
    ids = {end_of_turn_id(tokenizer)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def pad_token_id(tokenizer) -> int:
    """Padding id: pad_token, else eos_token (padding is masked out, the id only fills space)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise UserError("the tokenizer has neither pad_token nor eos_token")
    return int(pad)


def encode_responses(tokenizer, texts: Sequence[str], eot_id: int | None = None) -> list[list[int]]:
    """Response token ids: encode(text) + [end_of_turn] for each text."""
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    return [ids + [eot] for ids in encode_texts(tokenizer, texts)]


def check_template_boundary(tokenizer, *, prompt: str = "Hello, how are you?",
                            response: str = "I am fine, thank you!") -> str | None:
    """Check that tokens(prompt) + tokens(response) + [eot] is a prefix of tokens(full chat).

    Training tokenises prompt and response separately so the response mask is exact; this
    verifies that the result is what the template renders for the whole conversation.
    Returns None when consistent, else a description of the first difference.
    """
    if not has_chat_template(tokenizer):
        return "the tokenizer has no chat template"
    user = [{"role": "user", "content": prompt}]
    p = encode_prompt(tokenizer, user).input_ids.tolist()
    r = encode_responses(tokenizer, [response])[0]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    f = dedupe_bos(encode_text(tokenizer, full), getattr(tokenizer, "bos_token_id", None))
    if f[: len(p) + len(r)] == p + r:
        return None
    for i, (a, b) in enumerate(zip(p + r, f)):
        if a != b:
            return f"token {i}: separate encoding gives {a}, the full conversation gives {b}"
    return "the full conversation is shorter than prompt + response"
