"""evaluate.nll equals the mean token NLL of the chosen responses computed with PyTorch directly."""
import numpy as np
import torch

from distillm2_jax import api, objectives
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
    valid = target != objectives.IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = float(-(picked * valid).sum() / valid.sum())
    assert result.tokens == int(valid.sum()) and result.sequences == n
    np.testing.assert_allclose(result.nll, expected, rtol=1e-5)
    np.testing.assert_allclose(result.perplexity, np.exp(expected), rtol=1e-5)


def _torch_probs(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.int64),
                       attention_mask=torch.tensor(mask, dtype=torch.int64)).logits
    return torch.softmax(logits[:, :-1].double(), -1).numpy()


def test_acceptance_rate_matches_a_direct_computation(tmp_path):
    """rate = mean over response positions of sum_v min(p, q), from PyTorch's own logits."""
    from transformers import AutoModelForCausalLM

    paths = build_tiny_run(tmp_path, num_prompts=5)
    tok = api.load_tokenizer(str(paths["teacher"]))
    pairs = api.read_pairs(str(paths["pairs"]))
    result = api.acceptance_rate(api.from_pretrained(paths["student"]), api.from_pretrained(paths["teacher"]),
                                 pairs, tok, batch_size=2, max_length=48, max_prompt_length=24)

    batch = make_batch(pairs, tok, max_length=48, max_prompt_length=24)
    n = len(pairs)
    ids, mask, labels = (np.asarray(batch[k][:n]) for k in ("input_ids", "attention_mask", "labels"))
    q = _torch_probs(AutoModelForCausalLM.from_pretrained(str(paths["student"])), ids, mask)
    p = _torch_probs(AutoModelForCausalLM.from_pretrained(str(paths["teacher"])), ids, mask)
    valid = labels[:, 1:] != objectives.IGNORE_INDEX
    accept = np.minimum(p, q).sum(-1)
    agree = p.argmax(-1) == q.argmax(-1)
    assert result.tokens == int(valid.sum())
    # the draft's NLL from the same pass: PyTorch's log-probability of each response token
    tgt = labels[:, 1:]
    logq = np.log(np.take_along_axis(q, np.where(valid, tgt, 0)[..., None], axis=-1)[..., 0])
    np.testing.assert_allclose(result.draft_nll, -logq[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(result.draft_nll, api.nll(api.from_pretrained(paths["student"]), pairs, tok,
                                                         max_length=48, max_prompt_length=24).nll, rtol=1e-5)
    np.testing.assert_allclose(result.rate, accept[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(result.greedy_rate, agree[valid].mean(), rtol=1e-6)
    assert 0.0 < result.rate < 1.0
    # chunked along the sequence (5 positions per chunk, the last one padded): the same sums
    chunked = api.acceptance_rate(api.from_pretrained(paths["student"]), api.from_pretrained(paths["teacher"]),
                                  pairs, tok, batch_size=2, max_length=48, max_prompt_length=24, chunk_size=5)
    np.testing.assert_allclose([chunked.rate, chunked.greedy_rate, chunked.draft_nll],
                               [result.rate, result.greedy_rate, result.draft_nll], rtol=1e-6)
    assert chunked.tokens == result.tokens
    # Expected tokens per target call with k drafted tokens: sum_{i<=k} a^i.
    k = 3
    np.testing.assert_allclose(result.tokens_per_target_call(k), sum(result.rate ** i for i in range(k + 1)))


def test_a_model_accepts_all_of_its_own_drafts(tmp_path):
    paths = build_tiny_run(tmp_path, num_prompts=3)
    tok = api.load_tokenizer(str(paths["teacher"]))
    teacher = api.from_pretrained(paths["teacher"])
    result = api.acceptance_rate(teacher, teacher, str(paths["pairs"]), tok, max_length=48, max_prompt_length=24)
    np.testing.assert_allclose([result.rate, result.greedy_rate], [1.0, 1.0], rtol=1e-6)
