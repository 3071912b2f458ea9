"""Export a Decoder to a Hugging Face folder that `transformers` loads unchanged.

Writes safetensors (sharded with `model.safetensors.index.json` above `max_shard_size`), a
transformers-5 `config.json`, `generation_config.json`, and the tokenizer files. Tensors are
gathered to the host one at a time; on a multi-host mesh every process takes part in the
gather and only process 0 writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from distillm2_jax.errors import UserError
from distillm2_jax.hf.names import tensor_maps
from distillm2_jax.models.config import hf_config_from_dict
from distillm2_jax.models.decoder import Decoder

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


def _to_host(array: jax.Array) -> np.ndarray:
    if not getattr(array, "is_fully_addressable", True):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _hf_tensors(model: Decoder, np_dtype):
    """Yield (hf_name, host array) in checkpoint order, one parameter gathered at a time."""
    params = model.params()
    cfg = model.config
    for tmap in tensor_maps(cfg):
        value = params[tmap.path[0]] if len(tmap.path) == 1 else params["layers"][tmap.path[1]]
        host = _to_host(value).astype(np_dtype, copy=False)  # no second copy when the dtype matches
        names = tmap.hf_names(cfg.num_layers)
        if tmap.num_experts:  # one tensor per (layer, expert), layer-major like the names
            host = host.reshape((-1,) + host.shape[2:])
        for i, name in enumerate(names):
            arr = host[i] if tmap.stacked else host
            yield name, np.ascontiguousarray(arr.T if tmap.transpose else arr)


def _copy_tokenizer(tokenizer, out_dir: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out_dir))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise UserError(f"tokenizer={tokenizer!s}: not a folder or a tokenizer object")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise UserError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for name in copied:
        shutil.copyfile(src / name, out_dir / name)


def save_pretrained(model: Decoder, out_dir: str | Path, tokenizer=None, *, dtype=None,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` as an HF folder; `tokenizer` is a folder to copy from or a tokenizer object.

    dtype defaults to the parameters' dtype. Returns the output folder.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    writer = jax.process_index() == 0
    dtype = jnp.dtype(dtype or model.embed[...].dtype)
    np_dtype = np.dtype(dtype)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            stale.unlink()

    # Stream: a shard is written as soon as it is full, so at most one shard sits in host memory.
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal shard, size
        if shard and writer:
            tmp = out / f"model-{len(written) + 1:05d}.partial.safetensors"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            written.append((tmp, list(shard)))
        elif shard:
            written.append((Path(), list(shard)))
        shard, size = {}, 0

    for name, arr in _hf_tensors(model, np_dtype):
        if size and size + arr.nbytes > max_shard_size:
            flush()
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if writer:
        if len(written) == 1:
            written[0][0].rename(out / "model.safetensors")
        else:
            weight_map = {}
            for k, (tmp, names) in enumerate(written, start=1):
                fname = f"model-{k:05d}-of-{len(written):05d}.safetensors"
                tmp.rename(out / fname)
                weight_map.update({name: fname for name in names})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        hf_dict = dict(model.hf_config)
        if hf_dict.get("model_type") == "gemma3":  # an image-text model: write its text model
            hf_dict = dict(hf_dict.get("text_config") or {})
        hf_dict.pop("torch_dtype", None)
        hf_dict.pop("quantization_config", None)  # weights are written dequantized (e.g. gpt-oss MXFP4)
        hf_dict.update(dtype=dtype.name, vocab_size=model.config.vocab_size,
                       tie_word_embeddings=model.config.tie_word_embeddings)
        if not hf_dict.get("architectures"):
            hf_dict["architectures"] = [_ARCHITECTURES[model.config.model_type]]
        hf_cfg = hf_config_from_dict(hf_dict)
        hf_cfg.save_pretrained(str(out))
        src_gen = Path(tokenizer) / "generation_config.json" if isinstance(tokenizer, (str, Path)) else None
        if src_gen is not None and src_gen.is_file():
            shutil.copyfile(src_gen, out / "generation_config.json")
        else:
            GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(out))
        _copy_tokenizer(tokenizer, out)
    return out


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "olmo3": "Olmo3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
}
