"""Gradient accumulation: A micro-batches give the step of the whole batch (loss, metrics, grads),
whatever the split of tokens and empty rows, for both reductions."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distillm2_jax import losses, models
from distillm2_jax.train.step import Batch, StepConfig, StepInputs, TrainState, train_step
from tests.tiny_models import hf_config

B, T, V = 4, 24, 96   # 4 pairs per step


def _batch(seed=0):
    """[2B, T] rows with very different response lengths, one empty SGO response."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(2 * B, T))
    mask = np.zeros((2 * B, T), np.int32)
    labels = np.full((2 * B, T), -100)
    prompt = rng.integers(3, 8, size=B)
    lengths = [[14, 2, 9, 5], [3, 11, 0, 16]]   # TGO, SGO response lengths per pair
    for half in range(2):
        for i in range(B):
            row, p, r = half * B + i, prompt[i], lengths[half][i]
            ids[row, :p] = ids[i, :p]                  # the pair shares its prompt
            mask[row, :p + r] = 1
            labels[row, p:p + r] = ids[row, p:p + r]
    return ids.astype(np.int32), mask, labels.astype(np.int32)


def _split(x, num_micro):
    """[2B, T] -> [A, 2B/A, T]: micro-batch a holds pairs a, a + A, ... (TGO rows, then SGO)."""
    two = x.reshape(2, B // num_micro, num_micro, -1).transpose(2, 0, 1, 3)
    return jnp.asarray(two.reshape(num_micro, 2 * B // num_micro, -1))


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("objective", ["distillm2", "dpkd"])
def test_micro_batches_give_the_whole_batch_step(reduction, objective):
    student = models.from_config(hf_config("qwen2", hidden_size=32, intermediate_size=48,
                                           initializer_range=0.2), seed=0)
    teacher = models.from_config(hf_config("qwen2", initializer_range=0.2), seed=1)
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective=objective,
                     reduction=reduction, chunk_size=8)
    tx = optax.sgd(1.0)   # the update IS minus the gradient
    params = student.params()
    inputs = StepInputs(jnp.float32(0.5), jnp.float32(0.0),
                        jax.random.key_data(jax.random.key(0)), jnp.bool_(False))
    ids, mask, labels = _batch()

    def step(num_micro):
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        batch = Batch(*(_split(x, num_micro) for x in (ids, mask, labels)))
        new, metrics = jax.jit(lambda s: train_step(s, {}, teacher.params(), batch, inputs,
                                                    cfg=cfg, tx=tx))(state)
        return new.trainable, metrics

    whole, m1 = step(1)
    for num_micro in (2, 4):
        got, m = step(num_micro)
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        assert int(m["tokens"]) == int(m1["tokens"])
        for k in losses.ADDITIVE_METRICS & m.keys():
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_loss_denominators_count_over_micro_batches():
    _, _, labels = _batch()
    tok = losses.loss_denominators(jnp.asarray(labels), B, "token")
    seq = losses.loss_denominators(_split(labels, 2), B // 2, "sequence")
    assert float(tok["tgo"]) == 14 + 2 + 9 + 5 and float(tok["sgo"]) == 3 + 11 + 0 + 16
    assert (float(seq["tgo"]), float(seq["sgo"]), float(seq["all"]), float(seq["pairs"])) == (4, 3, 7, 3)
    with pytest.raises(ValueError, match="reduction"):
        losses.loss_denominators(jnp.asarray(labels), B, "mean")
