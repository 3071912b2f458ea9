"""b schedules (exact values), the a curriculum (easy -> small a, hard -> a0, off in epoch 1),
and the epoch reference m accumulated over all shards of a batch-sharded global array."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from distillm2_jax import objectives
from distillm2_jax.objectives import curriculum as cur


def test_b_schedules_exact():
    sched = jax.jit(lambda step, epoch: jnp.stack([
        cur.b_schedule("constant", step=step, total_steps=300, epoch=epoch, num_epochs=3),
        cur.b_schedule("linear", step=step, total_steps=300),
        cur.b_schedule("paper", step=step, total_steps=300, epoch=epoch, num_epochs=3),
        cur.b_schedule("paper", step=step, total_steps=300, epoch=epoch, num_epochs=3,
                       paper_period="epoch"),
    ]))
    # (step, epoch) -> constant, linear (authors), paper (T = run), paper (T = epoch)
    cases = {
        (0, 0): [0.5, 0.5, 0.5, 0.5],
        (75, 0): [0.5, 0.625, 0.5, 0.75],
        (150, 1): [0.5, 0.75, 1 / 3 + 50 / 300, 1 / 3 + 0.5],
        (240, 2): [0.5, 0.75, 2 / 3 + 40 / 300, 1.0],
        (299, 2): [0.5, 0.75, 2 / 3 + 99 / 300, 1.0],
    }
    for (step, epoch), want in cases.items():
        np.testing.assert_allclose(sched(step, epoch), want, rtol=1e-6, err_msg=str((step, epoch)))
    # paper (T = run) is exactly clip(fraction of the run done, 0.5, 1)
    np.testing.assert_allclose(sched(120, 1)[2], 0.5)  # 1/3 + 20/300 = 0.4 -> clipped to b0
    # the authors' formula: b = 0.5 * (1 + 0.5 * min(1, 2 step / total))
    for step in (0, 10, 37, 150, 151, 299):
        np.testing.assert_allclose(cur.b_linear(step, 300),
                                   0.5 * (1 + 0.5 * min(1.0, 2 * step / 300)), rtol=1e-6)
    with pytest.raises(ValueError, match="name="):
        cur.b_schedule("cosine", step=0, total_steps=10)


def test_b_paper_e_from_1_readings():
    """The printed rule with e counted from 1 (docs/experiments.md, "The b schedule: readings")."""
    def b(step, epoch, total, epochs, period):
        return float(cur.b_paper(step, total, epoch, epochs, period=period, first_epoch=1))

    # E = 3, 100 steps per epoch, T = steps per epoch: b = clip(1/3 + tau/100, 0.5, 1) in epoch 1,
    # 1 from tau = 67 (two thirds in) to its end; epoch 2 restarts at 2/3 and is back at 1 from
    # tau = 34; epoch 3 (e/E = 1) is 1 throughout.
    for (step, epoch), want in {(0, 0): 0.5, (16, 0): 0.5, (50, 0): 1 / 3 + 0.5, (66, 0): 1 / 3 + 0.66,
                                (67, 0): 1.0, (99, 0): 1.0, (100, 1): 2 / 3, (133, 1): 2 / 3 + 0.33,
                                (134, 1): 1.0, (200, 2): 1.0, (299, 2): 1.0}.items():
        np.testing.assert_allclose(b(step, epoch, 300, 3, "epoch"), want, rtol=1e-6, err_msg=str((step, epoch)))
    # E = 2: b = 0.5 + tau/100 in epoch 1, 1 from its middle on
    for (step, epoch), want in {(0, 0): 0.5, (30, 0): 0.8, (50, 0): 1.0, (99, 0): 1.0, (100, 1): 1.0}.items():
        np.testing.assert_allclose(b(step, epoch, 200, 2, "epoch"), want, rtol=1e-6, err_msg=str((step, epoch)))
    # T = run, e from 1: b = clip((step + steps per epoch) / total, 0.5, 1), 1 from the last epoch on
    for (step, epoch), want in {(0, 0): 0.5, (75, 0): 1 / 3 + 0.25, (150, 1): 2 / 3 + 50 / 300, (199, 1): 299 / 300,
                                (200, 2): 1.0, (299, 2): 1.0}.items():
        np.testing.assert_allclose(b(step, epoch, 300, 3, "run"), want, rtol=1e-6, err_msg=str((step, epoch)))
    # through b_schedule, and e from 0 is unchanged by the new argument
    np.testing.assert_allclose(cur.b_schedule("paper", step=50, total_steps=300, epoch=0, num_epochs=3,
                                              paper_period="epoch", paper_first_epoch=1), 1 / 3 + 0.5, rtol=1e-6)
    np.testing.assert_allclose(cur.b_paper(150, 300, 1, 3, first_epoch=0), cur.b_paper(150, 300, 1, 3), rtol=0)
    with pytest.raises(ValueError, match="first_epoch="):
        cur.b_paper(0, 300, 0, 3, first_epoch=2)


def test_skew_alpha_easy_small_hard_a0():
    m = 0.2
    gap = jnp.array([0.0, 0.1, 0.19, 0.2, 0.5, -0.3])
    a, stats = cur.skew_alpha(gap, m, enabled=True)
    g = np.asarray(gap, np.float64)
    want = np.clip(1 - 0.9 * m / (g + 1e-5), 0.01, 0.1)
    np.testing.assert_allclose(a, want, rtol=1e-5)
    assert a[0] == pytest.approx(0.01) and a[1] == pytest.approx(0.01)  # easy: small a
    assert 0.01 < a[2] < 0.1                                             # in between
    assert a[3] == pytest.approx(0.1, rel=1e-4) and a[4] == pytest.approx(0.1)  # hard: a0
    assert stats["alpha_min"] == pytest.approx(0.01) and stats["alpha_max"] == pytest.approx(0.1)
    assert stats["alpha_mean"] == pytest.approx(float(np.mean(want)), rel=1e-5)
    # off in the first epoch
    a_off, _ = cur.skew_alpha(gap, m, enabled=False)
    np.testing.assert_allclose(a_off, 0.1)
    a_jit = jax.jit(lambda g, e: cur.skew_alpha(g, m, enabled=e >= 1)[0])
    np.testing.assert_allclose(a_jit(gap, 0), 0.1)
    np.testing.assert_allclose(a_jit(gap, 1), want, rtol=1e-5)
    # stop-gradient
    assert float(jax.grad(lambda g: jnp.sum(cur.skew_alpha(g, m)[0]))(gap + 0.05).sum()) == 0.0


def test_curriculum_from_loss_metrics():
    """Gaps from the objective's metrics (or the log-prob pass) -> per-row a -> objective."""
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 5, 7)) * 3, jnp.float32)
    lab = jnp.asarray(np.where(np.arange(5) < 1, -100, rng.integers(0, 7, size=(4, 5))))

    @jax.jit
    def step(s, t, lab, m, epoch):
        seq = objectives.sequence_logprobs(s, t, lab)
        alpha, stats = cur.curriculum_alpha(seq, m, enabled=epoch >= 1)
        loss, metrics = objectives.objective("distillm2", s, t, lab, num_pairs=2, alpha=alpha)
        return alpha, stats, metrics

    alpha, stats, metrics = step(s, t, lab, 0.05, 1)
    lq, lp = np.asarray(metrics["student_logp_seq"]), np.asarray(metrics["teacher_logp_seq"])
    gap = np.concatenate([np.exp(lp[:2]) - np.exp(lq[:2]), np.exp(lq[2:]) - np.exp(lp[2:])])
    np.testing.assert_allclose(metrics["gap"], gap, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alpha, np.clip(1 - 0.9 * 0.05 / (gap + 1e-5), 0.01, 0.1),
                               rtol=1e-4)
    alpha0, _, _ = step(s, t, lab, 0.05, 0)
    np.testing.assert_allclose(alpha0, 0.1)


def test_reference_gap_over_all_shards():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(1)
    n = 32  # 16 pairs, 4 rows per device
    batches = []
    for _ in range(2):
        gap = rng.uniform(-0.2, 0.6, size=n).astype(np.float32)
        tokens = rng.integers(0, 5, size=n).astype(np.int32)  # some rows empty
        batches.append((gap, tokens))

    @jax.jit
    def update(stats, gap, tokens):
        return cur.update_gap_stats(stats, gap, tokens)

    stats = cur.init_gap_stats()
    for gap, tokens in batches:
        g, tk = jax.device_put(gap, sharding), jax.device_put(tokens, sharding)
        assert len(g.sharding.device_set) == 8
        stats = update(stats, g, tk)
    m = float(jax.jit(cur.reference_gap)(stats))
    all_gap = np.concatenate([g for g, _ in batches])
    all_valid = np.concatenate([tk for _, tk in batches]) > 0
    np.testing.assert_allclose(m, all_gap[all_valid].astype(np.float64).mean(), rtol=1e-5)
    tgo = np.concatenate([np.arange(n) < n // 2] * 2)
    np.testing.assert_allclose(float(stats.count_t), np.sum(all_valid & tgo))
    np.testing.assert_allclose(float(stats.sum_s), np.sum(all_gap[all_valid & ~tgo]), rtol=1e-5)
    assert float(cur.reference_gap(cur.init_gap_stats())) == 0.0
    # GapStats is a pytree (checkpointable with the train state)
    leaves = jax.tree.leaves(stats)
    assert len(leaves) == 4 and all(x.shape == () for x in leaves)
