"""Supervised fine-tuning on (prompt, response) examples: how the demo's teacher was trained
(`experiments/train_demo_teacher.py`) and the short warm-up that makes the demo's student.

Plain next-token cross-entropy on the response tokens (and the end-of-turn token), a token
mean over the batch, AdamW with linear warm-up and cosine decay, one jitted step. Batches are
tokenised exactly as training pairs are (`data.batches.make_batch`), so the chat template and
the end-of-turn token match what distillation later sees.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distillm2_jax.data.batches import IGNORE_INDEX, make_batch
from distillm2_jax.data.pairs import Pair
from distillm2_jax.models import Decoder, decoder


def tokenize(examples: Sequence[tuple[str, str]], tokenizer, *, max_length: int, max_prompt_length: int):
    """(input_ids, attention_mask, labels) [N, max_length] of prompt+response rows."""
    pairs = [Pair([{"role": "user", "content": p}], r, "") for p, r in examples]
    b = make_batch(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    n = len(pairs)
    out = [np.asarray(b[k][:n]) for k in ("input_ids", "attention_mask", "labels")]
    width = max_length - out[0].shape[1]
    if width > 0:
        out = [np.pad(x, ((0, 0), (0, width)), constant_values=IGNORE_INDEX if k == 2 else 0)
               for k, x in enumerate(out)]
    return tuple(out)


def token_cross_entropy(params, cfg, input_ids, attention_mask, labels):
    """Mean next-token NLL over the label positions (HF shift: position t predicts t+1)."""
    hidden, _ = decoder.forward(params, cfg, input_ids, attention_mask)
    logits = decoder.logits_from_hidden(params, cfg, hidden[:, :-1])
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, target, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def finetune(model: Decoder, examples: Sequence[tuple[str, str]], tokenizer, *, steps: int,
             batch_size: int = 64, lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.01,
             seed: int = 0, max_length: int = 64, max_prompt_length: int = 48, log_every: int = 100,
             log=print, progress: bool = False) -> tuple[Decoder, list[float]]:
    """Train every parameter of `model` for `steps` steps on shuffled `examples`.

    Returns the trained model (a new Decoder; `model` is not modified) and the loss per step.
    """
    ids, mask, labels = (jnp.asarray(x) for x in tokenize(examples, tokenizer, max_length=max_length,
                                                            max_prompt_length=max_prompt_length))
    cfg = model.config
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    params = jax.tree.map(jnp.copy, model.params())   # the step donates its buffers
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, idx):
        loss, grads = jax.value_and_grad(token_cross_entropy)(params, cfg, ids[idx], mask[idx], labels[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    order, pos, history = rng.permutation(len(examples)), 0, []
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, desc="supervised warm-up", disable=not progress, leave=False)
    for i in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(examples)), 0
        idx = jnp.asarray(order[pos:pos + batch_size])
        pos += batch_size
        params, opt_state, loss = step(params, opt_state, idx)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            history.append(float(loss))
            if log is not None:
                log(f"  sft step {i + 1}/{steps}: loss {float(loss):.4f}")
        bar.update(1)
    bar.close()
    return Decoder(cfg, params, hf_config=model.hf_config, compute_dtype=model.compute_dtype), history
