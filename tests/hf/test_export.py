"""Export details: sharded safetensors with an index, tied heads, tokenizer files, config keys."""
import json

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from distillm2_jax import models
from distillm2_jax.hf import from_pretrained, save_pretrained
from tests.tiny_models import hf_config, padded_batch


def test_sharded_export_round_trips(tmp_path):
    model = models.from_config(hf_config("llama"), seed=3)
    out = save_pretrained(model, tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert not list(out.glob("*.partial.*"))
    reloaded = from_pretrained(out)
    ids, mask = padded_batch(seed=8)
    np.testing.assert_array_equal(np.asarray(reloaded(ids, attention_mask=mask)),
                                  np.asarray(model(ids, attention_mask=mask)))
    # re-export to the same folder as a single file: stale shards and index are removed
    save_pretrained(model, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_tied_export_has_no_lm_head_and_keeps_dtype(tmp_path):
    model = models.from_config(hf_config("qwen2_tied"), seed=4, dtype=jnp.bfloat16)
    out = save_pretrained(model, tmp_path / "tied")
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype.name == "bfloat16"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]


def test_tokenizer_folder_is_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "do_sample": True}))
    model = models.from_config(hf_config("llama"), seed=5)
    out = save_pretrained(model, tmp_path / "with_tok", tokenizer=src)
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 7
