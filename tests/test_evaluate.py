"""evaluate.nll equals the mean token NLL of the chosen responses computed with PyTorch directly."""
import numpy as np
import torch

from distillm2_jax import api, losses
from distillm2_jax.data.batches import make_batch
from tests.tiny_models import build_hf_model
from tests.tiny_run import build_tiny_run


def test_nll_matches_torch(tmp_path):
    paths = build_tiny_run(tmp_path, num_prompts=5)
    torch_model = build_hf_model("qwen2", tmp_path / "m", vocab_size=400, hidden_size=64, initializer_range=0.2,
                                 bos_token_id=None, eos_token_id=2, pad_token_id=0)
    tok = api.load_tokenizer(str(paths["teacher"]))
    model = api.from_pretrained(tmp_path / "m")
    pairs = api.read_pairs(str(paths["pairs"]))
    result = api.nll(model, pairs, tok, batch_size=2, max_length=48, max_prompt_length=24, chunk_size=8)

    batch = make_batch(pairs, tok, max_length=48, max_prompt_length=24)
    n = len(pairs)
    ids, mask, labels = (torch.tensor(np.asarray(batch[k][:n], np.int64)) for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        logits = torch_model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    valid = target != losses.IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = float(-(picked * valid).sum() / valid.sum())
    assert result.tokens == int(valid.sum()) and result.sequences == n
    np.testing.assert_allclose(result.nll, expected, rtol=1e-5)
    np.testing.assert_allclose(result.perplexity, np.exp(expected), rtol=1e-5)
