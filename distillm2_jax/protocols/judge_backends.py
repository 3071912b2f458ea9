"""The judges `protocols.judge` can ask: a local model through the project's sampler, or an
OpenAI-compatible HTTP endpoint (`POST .../v1/chat/completions`, as vLLM and SGLang serve).

Both take a list of conversations and return one text per conversation, in order.
"""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp

from distillm2_jax.data.chat import encode_prompts, pad_token_id, stop_token_ids
from distillm2_jax.data.tokenizer import load_tokenizer
from distillm2_jax.errors import UserError
from distillm2_jax.generation import sample
from distillm2_jax.hf import from_pretrained
from distillm2_jax.models import align_vocab


def _fold_system(conv: list[dict]) -> list[dict]:
    """The system message put in front of the first user message (templates without a system role)."""
    system = "\n\n".join(m["content"] for m in conv if m["role"] == "system")
    rest = [dict(m) for m in conv if m["role"] != "system"]
    if system and rest:
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


class LocalJudge:
    """A local model as the judge: `evaluate`'s decoding path (chat template, the compiled
    sampler, continuous batching), sampled at `temperature` (the paper: 0.7) with a fixed seed.

    Prompts longer than `max_prompt_length` tokens keep their end (`data.chat`); how many were
    cut is in `truncated` after a call. Templates that reject a system message get the
    instructions at the top of the user message instead (`system_folded`).
    """

    def __init__(self, model, tokenizer, *, temperature: float = 0.7, max_new_tokens: int = 512,
                 max_prompt_length: int = 4096, batch_size: int = 16, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.max_prompt_length, self.batch_size = max_prompt_length, batch_size
        self.truncated = 0
        self.system_folded = False
        align_vocab(len(tokenizer), model)

    def _encode(self, convs):
        kw = dict(max_prompt_length=self.max_prompt_length, sanitize_control_tokens=True)
        if not self.system_folded:
            try:
                return encode_prompts(self.tokenizer, convs, **kw)
            except UserError:   # e.g. Gemma: "System role not supported"
                self.system_folded = True
        return encode_prompts(self.tokenizer, [_fold_system(c) for c in convs], **kw)

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        if not conversations:
            return []
        encoded = self._encode(conversations)
        self.truncated = sum(e.num_truncated > 0 for e in encoded)
        stops = set(stop_token_ids(self.tokenizer))
        results = sample(self.model, [e.input_ids.tolist() for e in encoded], max_new_tokens=self.max_new_tokens,
                         temperature=self.temperature, eos_ids=tuple(stops), seed=self.seed,
                         batch_size=self.batch_size, pad_id=pad_token_id(self.tokenizer))
        return [self.tokenizer.decode([t for t in r.tokens if t not in stops], skip_special_tokens=True)
                for r in results]


def chat_completions_url(url: str) -> str:
    """`http://host:port`, `.../v1` or the full `.../v1/chat/completions` -> the full URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--judge-url {url!r}: expected an http:// or https:// address")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint as the judge (standard library only).

    One request per conversation (`workers` in flight), `temperature`, `max_tokens` and a
    per-request `seed` (seed + index; servers that ignore it just sample). A connection failure
    or a 5xx answer is retried `retries` times; then, or on any other failure, a one-line
    UserError naming the URL.
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None, temperature: float = 0.7,
                 max_tokens: int = 512, timeout: float = 120.0, retries: int = 2, workers: int = 4,
                 seed: int = 0):
        self.url, self.model, self.api_key = chat_completions_url(url), model, api_key
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.retries, self.workers, self.seed = retries, workers, seed

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
                if err.code >= 500 and not last:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise UserError(f"judge endpoint {self.url}: HTTP {err.code} {err.reason}"
                                + (f" ({detail[:200]})" if detail else "")) from None
            except (TimeoutError, socket.timeout):
                if not last:
                    continue
                raise UserError(f"judge endpoint {self.url}: no answer within {self.timeout:g} s") from None
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                if not last:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                reason = getattr(err, "reason", err)
                raise UserError(f"judge endpoint {self.url}: cannot connect ({reason})") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"judge endpoint {self.url}: the answer is not JSON "
                            f"({raw[:100].decode('utf-8', 'replace')!r})") from None

    def _one(self, args) -> str:
        i, conv = args
        data = self._post({"model": self.model, "messages": conv, "temperature": self.temperature,
                           "max_tokens": self.max_tokens, "seed": self.seed + i})
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge endpoint {self.url}: no choices[0].message.content in the answer "
                            f"({json.dumps(data)[:150]})") from None
        return content if isinstance(content, str) else ""

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        if self.workers <= 1:
            return [self._one(a) for a in enumerate(conversations)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._one, enumerate(conversations)))


def build_judge(*, path: str | None = None, url: str | None = None, model_name: str | None = None,
                api_key_env: str | None = None, temperature: float = 0.7, max_new_tokens: int = 512,
                max_prompt_length: int = 4096, batch_size: int = 16, timeout: float = 120.0, workers: int = 4,
                seed: int = 0, dtype: str = "float32"):
    """A LocalJudge from the model folder `path`, or an HttpJudge for `url` (exactly one of them);
    the API key, if any, is read from the environment variable `api_key_env`."""
    if (path is None) == (url is None):
        raise UserError("give the judge as a local model folder (--judge DIR) or an endpoint (--judge-url URL), "
                        "one of the two")
    if not temperature >= 0:
        raise UserError(f"--judge-temperature must be 0 or more, got {temperature}")
    for flag, value in (("max-new-tokens", max_new_tokens), ("max-prompt-length", max_prompt_length),
                        ("workers", workers)):
        if value < 1:
            raise UserError(f"--judge-{flag} must be at least 1, got {value}")
    if not timeout > 0:
        raise UserError(f"--judge-timeout must be positive, got {timeout}")
    if url is not None:
        if not model_name:
            raise UserError("--judge-url needs --judge-model (the model name the server expects)")
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(f"--judge-api-key-env {api_key_env}: the variable is not set")
        return HttpJudge(url, model_name, api_key=key, temperature=temperature, max_tokens=max_new_tokens,
                         timeout=timeout, workers=workers, seed=seed)
    tokenizer = load_tokenizer(path)
    model = from_pretrained(path, dtype=getattr(jnp, dtype))
    return LocalJudge(model, tokenizer, temperature=temperature, max_new_tokens=max_new_tokens,
                      max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed)
