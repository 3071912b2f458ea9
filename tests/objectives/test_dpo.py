"""DPO and IPO: the loss, its gradient and metrics against an independent float64 numpy
derivation (per-token log-probs from logits computed in numpy) and finite differences; the
reference = policy limit (log 2); the chunked path against the unchunked one; the config checks;
a few trainer steps on a tiny model."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import config as config_lib
from distillm2_jax import objectives
from distillm2_jax.errors import UserError

B, T, V = 3, 7, 11


# ------------------------------------------------------------------------------------------
# Independent reference: numpy float64 log-softmax, label log-probs and the two losses.
# ------------------------------------------------------------------------------------------
def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_row_logps(logits, labels):
    """Per-row (sum of the response labels' log-probs, their count); position t predicts t + 1."""
    lsm = np_log_softmax(logits)
    sums, counts = [], []
    for r in range(labels.shape[0]):
        pos = [t for t in range(labels.shape[1] - 1) if labels[r, t + 1] != -100]
        sums.append(sum(lsm[r, t, labels[r, t + 1]] for t in pos))
        counts.append(len(pos))
    return np.array(sums), np.array(counts)


def _np_softplus(x):
    return np.logaddexp(0.0, x)


def np_loss(name, s, t, lab, beta, eps=0.0):
    """(loss, metrics) of dpo / ipo from numpy log-probs; pairs with an empty side are left out."""
    lq, n = np_row_logps(s, lab)
    lp, _ = np_row_logps(t, lab)
    if name == "ipo":
        lq, lp = lq / np.maximum(n, 1), lp / np.maximum(n, 1)
    b = len(lq) // 2
    valid = (n[:b] > 0) & (n[b:] > 0)
    chosen, rejected = lq[:b] - lp[:b], lq[b:] - lp[b:]
    h = chosen - rejected
    if name == "dpo":
        losses = (1 - eps) * _np_softplus(-beta * h) + eps * _np_softplus(beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    k = max(valid.sum(), 1)
    rc, rr = beta * chosen, beta * rejected
    metrics = {"reward_chosen": rc[valid].sum() / k, "reward_rejected": rr[valid].sum() / k,
               "reward_margin": (rc - rr)[valid].sum() / k, "reward_accuracy": (rc > rr)[valid].sum() / k}
    return losses[valid].sum() / k, metrics


def np_dpo_grad(s, t, lab, beta, eps):
    """d DPO / d student logits, derived by hand: dL/dz_i = ((1 - eps) (sigmoid(z_i) - 1) +
    eps sigmoid(z_i)) / k for z_i = beta h_i, and d lq_row / d logits[row, t] = onehot - softmax."""
    lq, n = np_row_logps(s, lab)
    lp, _ = np_row_logps(t, lab)
    b = len(lq) // 2
    valid = (n[:b] > 0) & (n[b:] > 0)
    k = max(valid.sum(), 1)
    z = beta * ((lq[:b] - lp[:b]) - (lq[b:] - lp[b:]))
    sig = 1 / (1 + np.exp(-z))
    dz = np.where(valid, ((1 - eps) * (sig - 1) + eps * sig) / k, 0.0)
    soft = np.exp(np_log_softmax(s))
    g = np.zeros_like(soft)
    for r in range(2 * b):
        sign, i = (1.0, r) if r < b else (-1.0, r - b)
        for pos in range(lab.shape[1] - 1):
            y = lab[r, pos + 1]
            if y == -100:
                continue
            onehot = np.zeros(s.shape[-1])
            onehot[y] = 1.0
            g[r, pos] = dz[i] * beta * sign * (onehot - soft[r, pos])
    return g


def make_batch(seed, b=B, t=T, v=V):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2 * b, t, v)) * 2
    te = rng.normal(size=(2 * b, t, v)) * 2
    lab = rng.integers(0, v, size=(2 * b, t))
    for r in range(2 * b):
        lab[r, : 1 + r % 3] = -100           # prompts of 1..3 tokens
        if r % 2:
            lab[r, t - 2:] = -100            # right padding
    lab[b + 1] = -100                        # pair 1's rejected side is empty: pair 1 is left out
    return s, te, lab


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def values():
    s, te, lab = make_batch(0)
    cases = [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)]

    @jax.jit
    def run(s_, t_):
        out = {}
        for name, beta, eps in cases:
            opts = {"label_smoothing": eps} if name == "dpo" else None
            out[(name, beta, eps)] = objectives.objective(name, s_, t_, lab, num_pairs=B, beta=beta, options=opts)
        return out

    return (s, te, lab), cases, run(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32))


def test_loss_and_metrics_match_numpy(values):
    (s, te, lab), cases, out = values
    for case in cases:
        name, beta, eps = case
        got, metrics = out[case]
        want, want_m = np_loss(name, s, te, lab, beta, eps)
        np.testing.assert_allclose(float(got), want, rtol=2e-5, err_msg=str(case))
        for k, v in want_m.items():
            np.testing.assert_allclose(float(metrics[k]), v, rtol=2e-5, atol=1e-6, err_msg=f"{case} {k}")
        assert float(metrics["loss"]) == pytest.approx(float(got))


def test_label_smoothing_and_ipo_are_not_plain_dpo(values):
    """The options reach the loss: the three variants differ on the same batch."""
    _, _, out = values
    plain, smooth, ipo = (float(out[c][0]) for c in [("dpo", 0.5, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.7, 0.0)])
    assert len({round(plain, 6), round(smooth, 6), round(ipo, 6)}) == 3


@pytest.mark.parametrize("name,eps", [("dpo", 0.0), ("dpo", 0.3), ("ipo", 0.0)])
def test_reference_equal_to_policy(name, eps):
    """With the reference equal to the policy every log-ratio is 0: DPO's loss is log 2 for
    any label smoothing, IPO's 1 / (4 beta^2); every reward is 0 and no pair is 'accurate'."""
    s, _, lab = make_batch(1)
    s = jnp.asarray(s, jnp.float32)
    opts = {"label_smoothing": eps} if name == "dpo" else None
    loss, m = objectives.objective(name, s, s, lab, num_pairs=B, beta=0.25, options=opts)
    want = np.log(2.0) if name == "dpo" else 1 / (4 * 0.25 ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        assert float(m[k]) == 0.0, k


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_gradient_matches_hand_derivation_and_finite_differences(eps):
    with jax.enable_x64(True):
        s, te, lab = make_batch(2)
        te64 = jnp.asarray(te, jnp.float64)
        f = jax.jit(lambda x: objectives.objective("dpo", x, te64, lab, num_pairs=B, beta=0.5,
                                                   options={"label_smoothing": eps})[0])
        g = np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float64)))
        np.testing.assert_allclose(g, np_dpo_grad(s, te, lab, 0.5, eps), rtol=1e-9, atol=1e-12)
        rng = np.random.default_rng(3)
        for _ in range(3):
            d = rng.normal(size=s.shape)
            h = 1e-6
            fd = (float(f(s + h * d)) - float(f(s - h * d))) / (2 * h)
            np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-6, atol=1e-10)
        # the reference gets no gradient
        gt = jax.grad(lambda t_: objectives.objective("dpo", jnp.asarray(s), t_, lab, num_pairs=B)[0])(te64)
        assert not np.any(np.asarray(gt))
    assert not jax.config.jax_enable_x64


def test_ipo_gradient_finite_differences():
    with jax.enable_x64(True):
        s, te, lab = make_batch(4)
        f = jax.jit(lambda x: objectives.objective("ipo", x, jnp.asarray(te), lab, num_pairs=B, beta=0.3)[0])
        g = np.asarray(jax.grad(f)(jnp.asarray(s)))
        assert np.any(g)
        d = np.random.default_rng(5).normal(size=s.shape)
        fd = (float(f(s + 1e-6 * d)) - float(f(s - 1e-6 * d))) / 2e-6
        np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-6)


def test_micro_batches_add_up_to_the_batch():
    """With the batch's pair count as denominator, micro-batch losses and metrics add up to the
    whole batch's (the trainer's gradient accumulation)."""
    s, te, lab = make_batch(6, b=4)
    s, te = jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32)
    halves = np.stack([np.concatenate([lab[i:i + 2], lab[4 + i:4 + i + 2]]) for i in (0, 2)])

    @jax.jit
    def run(s, te):
        dpo = functools.partial(objectives.objective, "dpo", beta=0.3, options={"label_smoothing": 0.1})
        whole = dpo(s, te, lab, num_pairs=4)
        denoms = objectives.loss_denominators(jnp.asarray(halves), 2)
        parts = [dpo(s[rows], te[rows], halves[j], num_pairs=2, denominators=denoms)
                 for j, rows in enumerate(np.r_[i:i + 2, 4 + i:4 + i + 2] for i in (0, 2))]
        return whole, parts

    (whole, wm), parts = run(s, te)
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-6)
    for k in ("reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(wm[k]), rtol=1e-6, atol=1e-7)


def test_options_are_checked():
    s, te, lab = make_batch(7)
    with pytest.raises(ValueError, match="objective 'ipo' takes none, got 'label_smoothing'"):
        objectives.objective("ipo", s, te, lab, num_pairs=B, options={"label_smoothing": 0.1})
    with pytest.raises(ValueError, match=r"label_smoothing=0.5: must be in \[0, 0.5\)"):
        objectives.objective("dpo", s, te, lab, num_pairs=B, options={"label_smoothing": 0.5})
    with pytest.raises(ValueError, match="needs the teacher"):
        objectives.objective("dpo", s, None, lab, num_pairs=B)


# ------------------------------------------------------------------------------------------
# The chunked path (what the train step runs)
# ------------------------------------------------------------------------------------------
def test_chunked_equals_unchunked_with_options():
    """Values, metrics and gradients (hidden and head) of the fused and remat chunked paths equal
    the unchunked loss, with label smoothing and for IPO; the sums equal `label_logprobs`."""
    rng = np.random.default_rng(8)
    h, v = 5, 23
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    hs, ws, ht, wt = f(2 * B, T, h), f(h, v), f(2 * B, T, h), f(h, v)
    lab = jnp.asarray(make_batch(9, v=v)[2], jnp.int32)
    cases = [("dpo", {"label_smoothing": 0.2}, "fused", 3), ("dpo", {"label_smoothing": 0.2}, "remat", 4),
             ("ipo", None, "fused", 5)]

    @jax.jit
    def run(hs, ws):
        out = []
        for name, opts, mode, chunk in cases:
            def ref(a, b):
                zs, zt = jnp.einsum("nth,hv->ntv", a, b), jnp.einsum("nth,hv->ntv", ht, wt)
                return objectives.objective(name, zs, zt, lab, num_pairs=B, beta=0.4, options=opts)

            def got(a, b):
                return objectives.chunked_objective(name, a, b, ht, wt, lab, num_pairs=B, beta=0.4,
                                                    chunk_size=chunk, grad_mode=mode, options=opts)
            out.append((jax.value_and_grad(ref, (0, 1), has_aux=True)(hs, ws),
                        jax.value_and_grad(got, (0, 1), has_aux=True)(hs, ws)))
        sums = (objectives.label_logprobs(hs, ws, lab, chunk_size=3)[0],
                objectives.label_logprobs(ht, wt, lab, chunk_size=3)[0])
        return out, sums

    out, (lq, lp) = run(hs, ws)
    for case, (((v0, m0), g0), ((v1, m1), g1)) in zip(cases, out):
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5, err_msg=str(case))
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(case))
        for k in objectives.get(case[0]).parts:
            np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=f"{case} {k}")
    # the chunked DPO value from the chunked label log-prob sums, by the numpy formula
    lq, lp = np.asarray(lq, np.float64), np.asarray(lp, np.float64)
    valid = np.array([True, False, True])
    z = 0.4 * ((lq[:B] - lp[:B]) - (lq[B:] - lp[B:]))
    want = ((0.8 * _np_softplus(-z) + 0.2 * _np_softplus(z))[valid]).mean()
    np.testing.assert_allclose(float(out[0][1][0][0]), want, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["objective.name=dpo"], "data.pairs: required by objective dpo: a preference pair file"),
    (["objective.name=kd", "model.reference=/r"],
     "model.reference: the frozen reference of objectives dpo, ipo only; objective kd does not use it"),
    (["objective.name=ipo", "data.pairs=p.jsonl", "objective.label_smoothing=0.1"],
     "objective.label_smoothing: applies to objective dpo only; objective ipo does not use it"),
    (["objective.name=dpo", "data.pairs=p.jsonl", "objective.label_smoothing=0.5"],
     "objective.label_smoothing: must be < 0.5"),
    (["objective.name=dpo", "data.pairs=p.jsonl", "objective.dpo_beta=0"], "objective.dpo_beta: must be > 0"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_lib.with_overrides(config_lib.Config(), ["model.student=s"] + overrides).check_required()


def test_config_needs_no_teacher():
    cfg = config_lib.with_overrides(config_lib.Config(), ["model.student=s", "objective.name=dpo",
                                                          "data.pairs=p.jsonl", "model.reference=r"])
    assert cfg.check_required() is cfg and cfg.model.teacher is None


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------
def write_separable_pairs(prompts_file, out):
    """Pairs whose chosen answer is always 'red red red' and rejected one 'blue blue blue', for
    the prompts of a tiny run: trivially separable preferences."""
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    with open(out, "w") as f:
        for p in prompts:
            user = {"role": "user", "content": p}
            f.write(json.dumps({"prompt": p, "chosen": [user, {"role": "assistant", "content": "red red red"}],
                                "rejected": [user, {"role": "assistant", "content": "blue blue blue"}]}) + "\n")
    return out


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """The tiny run's models with trivially separable pairs."""
    from tests.tiny_run import build_tiny_run

    root = tmp_path_factory.mktemp("dpo")
    tiny = build_tiny_run(root, num_prompts=16)
    return {**tiny, "pairs": write_separable_pairs(tiny["prompts"], root / "separable.jsonl")}


def _dpo_config(tiny, run_dir, **overrides):
    from tests.tiny_run import tiny_config

    base = {"objective.name": "dpo", "objective.dpo_beta": 0.5, "checkpoint.every_steps": 100,
            "generation.regenerate_student": "true"}
    return tiny_config(tiny, run_dir, **{**base, **overrides})


def test_trainer_dpo_learns_separable_pairs(separable, tmp_path):
    """Step 1 has the reference equal to the policy (loss log 2, rewards 0 up to rounding: the
    policy's forward runs under autodiff); the loss falls and the reward accuracy rises to 1.
    model.teacher and data.prompts are set, yet nothing is generated and the teacher is not
    loaded: the reference is a second copy of the starting student."""
    from distillm2_jax.train.loop import Trainer

    cfg = _dpo_config(separable, tmp_path / "run", **{"train.epochs": 3, "optim.lr": 1e-2,
                                                      "objective.label_smoothing": 0.1})
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert trainer.teacher.config == trainer.student.config and trainer.teacher is not trainer.student
    result = trainer.run()
    hist = result.history
    assert len(hist) == 6
    assert hist[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert abs(hist[0]["reward_margin"]) < 1e-5 and hist[0]["beta"] == 0.5
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert hist[-1]["reward_accuracy"] == 1.0 and hist[-1]["reward_margin"] > 0.1
    assert not (tmp_path / "run" / "data").exists()   # no teacher or student generation


def test_trainer_dpo_lora_reference_is_the_frozen_base(separable, tmp_path):
    """With LoRA the reference is the student's own frozen base weights (no second copy);
    `model.reference` loads another folder instead."""
    from distillm2_jax.train.loop import Trainer

    cfg = _dpo_config(separable, tmp_path / "run", **{"lora.enabled": "true", "lora.dropout": 0.1,
                                                      "optim.lr": 5e-2, "train.epochs": 1})
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert trainer.teacher_params is trainer.frozen and trainer.teacher is trainer.student
    other = Trainer(_dpo_config(separable, tmp_path / "other", **{"lora.enabled": "true",
                                                                  "model.reference": separable["teacher"]}),
                    log=lambda *a, **k: None)
    assert other.teacher.config.hidden_size == 64 and other.teacher_params is not other.frozen


@pytest.mark.slow
@pytest.mark.parametrize("mode,lora", [("qat", "false"), ("qlora", "true")])
def test_trainer_dpo_quantized_student_starts_at_its_own_reference(separable, tmp_path, mode, lora):
    """A quantized student's reference is the starting student as its forward computes it
    (QAT: fake-quantized; QLoRA: the quantized base), so step 1 is at log 2."""
    from distillm2_jax.train.loop import Trainer

    cfg = _dpo_config(separable, tmp_path / "run", **{"model.quantization.mode": mode, "lora.enabled": lora,
                                                      "model.quantization.group_size": 0, "train.epochs": 1,
                                                      "optim.lr": 1e-2})
    hist = Trainer(cfg, log=lambda *a, **k: None).run().history
    assert hist[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert hist[1]["loss"] < hist[0]["loss"]
