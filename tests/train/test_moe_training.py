"""Mixture-of-experts models in training: a MoE teacher distils into a dense student; a MoE
student's loss carries its router's load-balancing loss times `router_aux_loss_coef`."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distillm2_jax import models
from distillm2_jax.models import decoder, moe
from distillm2_jax.train.batch import Batch
from distillm2_jax.train.step import StepConfig, StepInputs, TrainState, micro_loss, train_step
from tests.moe_models import build_moe_model, moe_hf_config
from tests.tiny_models import hf_config
from tests.train.test_step import _batch, _split

INPUTS = StepInputs(jnp.float32(0.3), jnp.float32(0.0), jax.random.key_data(jax.random.key(0)), jnp.bool_(False))


def test_moe_teacher_dense_student_steps_lower_the_loss():
    teacher = models.from_config(moe_hf_config("qwen3_moe", initializer_range=0.2), seed=1)
    student = models.from_config(hf_config("qwen2", hidden_size=32, intermediate_size=48, initializer_range=0.2))
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective="kd", chunk_size=8)
    tx = optax.adam(1e-2)
    shared, _ = _batch()
    batch = Batch(*(_split(x, 2) for x in shared))
    step = jax.jit(lambda s: train_step(s, {}, teacher.params(), batch, INPUTS, cfg=cfg, tx=tx))
    state = TrainState(jnp.zeros((), jnp.int32), student.params(), tx.init(student.params()))
    losses = []
    for _ in range(6):
        state, metrics = step(state)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert "router_aux_loss" not in metrics   # a dense student has no router


def test_moe_student_adds_its_router_loss_times_the_coefficient():
    student = models.from_config(moe_hf_config("qwen3_moe", num_hidden_layers=1, initializer_range=0.2))
    coef = student.config.router_aux_loss_coef
    assert coef == 0.02
    shared, _ = _batch()
    micro = Batch(*(jnp.asarray(x) for x in shared))

    # one program: the step's loss of one micro-batch, the same as one of 2 micro-batches, and the
    # aux loss of forward (not forward_pairs) on the same pairs as [prompt | response] rows
    _, (rows, row_mask, _) = _batch()
    cfg = StepConfig(student=student.config, teacher=None, objective="sft", chunk_size=8)

    @jax.jit
    def run(p):
        one = micro_loss(p, {}, None, cfg, micro, INPUTS)
        two = micro_loss(p, {}, None, cfg, micro, INPUTS, num_micro=2)[0]
        stats = decoder.forward(p, student.config, rows, row_mask, router_stats=True)[2]
        return one, two, moe.load_balancing_loss(stats)

    (loss, metrics), half, aux = run(student.params())
    assert float(aux) > 1.0   # E * sum(f * P) >= 1, with equality only for a perfect balance
    np.testing.assert_allclose(float(metrics["router_aux_loss"]), float(aux), rtol=1e-5)
    # loss = objective + coef * aux / num_micro
    np.testing.assert_allclose(float(loss) - float(half), coef * float(aux) / 2, rtol=1e-3)


@pytest.mark.slow
def test_trainer_run_with_a_moe_teacher_generates_and_lowers_the_loss(tmp_path):
    """Algorithm 1 end to end: the MoE teacher generates its responses with the KV-cache sampler,
    the dense student trains for an epoch (two steps), the loss decreases."""
    from distillm2_jax.train.loop import train
    from tests.tiny_run import build_tiny_run, tiny_config
    from tests.tiny_tokenizer import VOCAB_SIZE, build_tiny_tokenizer

    paths = build_tiny_run(tmp_path / "tiny", num_prompts=16)
    shutil.rmtree(paths["teacher"])
    build_moe_model("qwen3_moe", paths["teacher"], vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=2,
                    pad_token_id=0, initializer_range=0.1)
    build_tiny_tokenizer(tmp_path / "tok").save_pretrained(str(paths["teacher"]))
    run = train(tiny_config(paths, tmp_path / "run", **{"data.pairs": "null", "train.micro_batch": 8,
                                                          "train.epochs": 1}))
    losses = [h["loss"] for h in run.history]
    assert (tmp_path / "run" / "data" / "teacher.jsonl").is_file()
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
