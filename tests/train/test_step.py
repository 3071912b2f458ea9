"""Gradient accumulation: A micro-batches give the step of the whole batch (loss, metrics, grads),
whatever the split of tokens and empty rows, for both reductions."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distillm2_jax import models, objectives
from distillm2_jax.objectives import curriculum
from distillm2_jax.models import decoder
from distillm2_jax.train.batch import Batch
from distillm2_jax.train.step import (StepConfig, StepInputs, TrainState, measure_gaps, micro_loss,
                                      teacher_sequence_logprobs, train_step)
from tests.tiny_models import hf_config

B, P, R, V = 4, 8, 16, 96   # 4 pairs per step; prompts of up to P, responses of up to R tokens
LENGTHS = [[14, 2, 9, 5], [3, 11, 0, 16]]   # TGO, SGO response lengths per pair


def _batch(seed=0):
    """The shared-prompt arrays (prompts [B, P], responses [2B, R]) and the same pairs as
    [2B, P + R] rows: very different response lengths, one empty SGO response."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(3, P + 1, size=B)
    prompt_ids = np.zeros((B, P), np.int32)
    prompt_mask = np.zeros((B, P), np.int32)
    response_ids = np.zeros((2 * B, R), np.int32)
    response_mask = np.zeros((2 * B, R), np.int32)
    rows = np.zeros((2 * B, P + R), np.int32)
    row_mask = np.zeros((2 * B, P + R), np.int32)
    row_labels = np.full((2 * B, P + R), -100, np.int32)
    for i in range(B):
        lp = prompt_len[i]
        prompt_ids[i, P - lp:] = rng.integers(3, V, size=lp)
        prompt_mask[i, P - lp:] = 1
    for half in range(2):
        for i in range(B):
            row, lp, lr = half * B + i, prompt_len[i], LENGTHS[half][i]
            response_ids[row, :lr] = rng.integers(3, V, size=lr)
            response_mask[row, :lr] = 1
            rows[row, :lp] = prompt_ids[i, P - lp:]
            rows[row, lp:lp + lr] = response_ids[row, :lr]
            row_mask[row, :lp + lr] = 1
            row_labels[row, lp:lp + lr] = response_ids[row, :lr]
    labels = np.where(response_mask == 1, response_ids, -100).astype(np.int32)
    pair_major = lambda x: np.stack([x[:B], x[B:]], axis=1).reshape(x.shape)  # noqa: E731
    shared = (prompt_ids, prompt_mask, pair_major(response_ids), pair_major(response_mask), pair_major(labels))
    return shared, (rows, row_mask, row_labels)


def _split(x, num_micro, halves=False):
    """Micro-batch a holds pairs a, a + A, ...: prompts [B, P] -> [A, B/A, P]; pair-major responses
    [2B, R] -> [A, 2B/A, R] pair-major; with `halves`, [TGO; SGO] rows -> [A, 2B/A, T] the same."""
    if x.shape[0] == B:
        return jnp.asarray(x.reshape(B // num_micro, num_micro, -1).transpose(1, 0, 2))
    if halves:
        two = x.reshape(2, B // num_micro, num_micro, -1).transpose(2, 0, 1, 3)
    else:
        two = x.reshape(B // num_micro, num_micro, 2, -1).transpose(1, 0, 2, 3)
    return jnp.asarray(two.reshape(num_micro, 2 * B // num_micro, -1))


def _models():
    student = models.from_config(hf_config("qwen2", hidden_size=32, intermediate_size=48,
                                           initializer_range=0.2), seed=0)
    teacher = models.from_config(hf_config("qwen2", initializer_range=0.2), seed=1)
    return student, teacher


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_step_loss_and_gradient_equal_the_rows_layout_reference(family):
    """The shared-prompt step (prompts run once per pair) = `objectives.objective` on full logits of
    the [prompt | response] rows, in value and gradient; gemma2 adds windows and soft-caps."""
    student = models.from_config(hf_config(family, initializer_range=0.2), seed=0)
    teacher = models.from_config(hf_config(family, hidden_size=96, initializer_range=0.2), seed=1)
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective="distillm2", chunk_size=8)
    inputs = StepInputs(jnp.float32(0.3), jnp.float32(0.0), jax.random.key_data(jax.random.key(0)),
                        jnp.bool_(False))
    shared, (rows, row_mask, row_labels) = _batch(3)
    micro = Batch(*(jnp.asarray(x) for x in shared))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: micro_loss(p, {}, teacher.params(), cfg, micro, inputs), has_aux=True))(student.params())

    def reference(p):
        def logits(params, config):
            h, _ = decoder.forward(params, config, rows, row_mask)
            return models.logits_from_hidden(params, config, h)
        return objectives.objective("distillm2", logits(p, student.config), logits(teacher.params(), teacher.config),
                                row_labels, num_pairs=B, alpha=0.1, beta=0.3)[0]

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(student.params())
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    assert int(metrics["tokens"]) == int((row_labels != -100).sum())
    for path, a in jax.tree_util.tree_leaves_with_path(grads):
        b = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()), err_msg=str(path))


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("objective", ["distillm2", "dpkd"])
def test_micro_batches_give_the_whole_batch_step(reduction, objective):
    student, teacher = _models()
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective=objective,
                     reduction=reduction, chunk_size=8)
    tx = optax.sgd(1.0)   # the update IS minus the gradient
    params = student.params()
    inputs = StepInputs(jnp.float32(0.5), jnp.float32(0.0),
                        jax.random.key_data(jax.random.key(0)), jnp.bool_(False))
    shared, _ = _batch()

    def step(num_micro):
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        batch = Batch(*(_split(x, num_micro) for x in shared))
        new, metrics = jax.jit(lambda s: train_step(s, {}, teacher.params(), batch, inputs,
                                                    cfg=cfg, tx=tx))(state)
        return new.trainable, metrics

    whole, m1 = step(1)
    for num_micro in (2, 4):
        got, m = step(num_micro)
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        assert int(m["tokens"]) == int(m1["tokens"])
        for k in objectives.ADDITIVE_METRICS & m.keys():
            np.testing.assert_allclose(m[k], m1[k], rtol=3e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_loss_denominators_count_over_micro_batches():
    _, (_, _, labels) = _batch()
    tok = objectives.loss_denominators(jnp.asarray(labels), B, "token")
    seq = objectives.loss_denominators(_split(labels, 2, halves=True), B // 2, "sequence")
    assert float(tok["tgo"]) == 14 + 2 + 9 + 5 and float(tok["sgo"]) == 3 + 11 + 0 + 16
    assert (float(seq["tgo"]), float(seq["sgo"]), float(seq["all"]), float(seq["pairs"])) == (4, 3, 7, 3)
    with pytest.raises(ValueError, match="reduction"):
        objectives.loss_denominators(jnp.asarray(labels), B, "mean")


def test_teacher_logprobs_given_to_the_step_equal_computing_them_inside_it():
    """The curriculum with the teacher's per-sequence log-probs passed in (what the trainer does
    from epoch 2: computed once per epoch) gives the step that computes them in its gap pass; the
    passed values are the mean label log-probs of full teacher logits, re-derived in numpy."""
    student, teacher = _models()
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective="distillm2",
                     curriculum=True, chunk_size=8)
    num_micro = 2
    shared, (rows, row_mask, row_labels) = _batch()
    batch = Batch(*(_split(x, num_micro) for x in shared))
    lp = jax.jit(lambda t, b: teacher_sequence_logprobs(t, b, cfg=cfg))(teacher.params(), batch)

    def mean_label_logprobs(model):   # [2B] in the [TGO; SGO] row order, float64
        h, _ = decoder.forward(model.params(), model.config, rows, row_mask)
        logits = np.asarray(models.logits_from_hidden(model.params(), model.config, h), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        out = np.zeros(2 * B)
        for r in range(2 * B):
            pos = np.nonzero(row_labels[r, 1:] != -100)[0]   # position t predicts token t + 1
            out[r] = logp[r, pos, row_labels[r, pos + 1]].mean() if len(pos) else 0.0
        return out

    lp_teacher, lp_student = mean_label_logprobs(teacher), mean_label_logprobs(student)
    np.testing.assert_allclose(lp, _split(lp_teacher[:, None], num_micro, halves=True)[..., 0], rtol=1e-5, atol=1e-6)

    stats0 = curriculum.init_gap_stats()
    measured = jax.jit(lambda s, t, b: measure_gaps(s, student.params(), t, b, cfg=cfg))(
        stats0, teacher.params(), batch)
    given = jax.jit(lambda s, b, lp: measure_gaps(s, student.params(), None, b, cfg=cfg, teacher_logp_seq=lp))(
        stats0, batch, lp)
    for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(measured)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # m = the largest gap: every other row with a positive gap gets a < a0 (a = a0 at the reference)
    gaps = np.where(np.arange(2 * B) < B, 1, -1) * (np.exp(lp_teacher) - np.exp(lp_student))
    assert np.sum(gaps > 0) >= 3
    m = jnp.float32(gaps.max())

    tx = optax.sgd(1.0)
    params = student.params()

    def step(teacher_logp_seq):
        inputs = StepInputs(jnp.float32(0.5), m, jax.random.key_data(jax.random.key(0)), jnp.bool_(True),
                            teacher_logp_seq)
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        return jax.jit(lambda s: train_step(s, {}, teacher.params(), batch, inputs, cfg=cfg, tx=tx))(state)

    (new_in_step, m_in_step), (new_given, m_given) = step(None), step(lp)
    assert m_given["alpha_min"] < m_given["alpha_max"]   # the curriculum is live: a varies per row
    for k in ("loss", "alpha_min", "alpha_max", "alpha_mean", "skl", "srkl"):
        np.testing.assert_allclose(m_given[k], m_in_step[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(new_given.trainable), jax.tree.leaves(new_in_step.trainable)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))
