"""objectives.objective against an independent float64 numpy re-derivation from docs/paper.md,
finite-difference gradients, limits, and property-based checks of the divergences."""
import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillm2_jax import objectives
from distillm2_jax.objectives import divergences

B, T, V = 2, 6, 9
NAMES = objectives.NAMES


# ------------------------------------------------------------------------------------------
# Independent reference: plain loops over rows and positions, float64, formulas of paper.md.
# ------------------------------------------------------------------------------------------
def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(a, b):
    return float(np.sum(a * (np.log(a) - np.log(b))))


def ref_token_terms(s_logits, t_logits, labels, alpha, beta):
    """For every row: list of dicts of per-token quantities at the response positions."""
    rows = []
    for r in range(s_logits.shape[0]):
        toks = []
        for t in range(s_logits.shape[1] - 1):
            y = labels[r, t + 1]
            if y == -100:
                continue
            q = _softmax(s_logits[r, t])
            p = _softmax(t_logits[r, t])
            a = alpha[r]
            m_gkd = beta * p + (1 - beta) * q
            toks.append({
                "logq_y": float(np.log(q[y])),
                "logp_y": float(np.log(p[y])),
                "skl": _kl(p, a * p + (1 - a) * q),          # KL(p || a p + (1-a) q)
                "srkl": _kl(q, (1 - a) * p + a * q),         # KL(q || (1-a) p + a q)
                "fkl": _kl(p, q),
                "rkl": _kl(q, p),
                "jsd": (_kl(p, q) if beta == 0 else _kl(q, p) if beta == 1
                        else beta * _kl(p, m_gkd) + (1 - beta) * _kl(q, m_gkd)),
            })
        rows.append(toks)
    return rows


def ref_objective(name, s_logits, t_logits, labels, num_pairs, alpha, beta, reduction,
                  normalization="paper"):
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), (2 * num_pairs,))
    rows = ref_token_terms(s_logits, t_logits, labels, alpha, beta)
    tgo = list(range(num_pairs))
    sgo = list(range(num_pairs, 2 * num_pairs))

    def reduce(key, row_ids, sign=1.0):
        if reduction == "token":
            vals = [sign * tok[key] for r in row_ids for tok in rows[r]]
            return sum(vals) / max(len(vals), 1)
        seq_means = [sign * np.mean([tok[key] for tok in rows[r]]) for r in row_ids if rows[r]]
        return sum(seq_means) / max(len(seq_means), 1)

    if name == "distillm2":
        skl, srkl = reduce("skl", tgo), reduce("srkl", sgo)
        if normalization == "paper":
            return (1 - beta) * skl + beta * srkl
        bc = 2 * beta
        return (2 - bc) * skl + bc * srkl
    if name == "distillm":
        return reduce("srkl", tgo + sgo)
    if name == "kd":
        return reduce("fkl", tgo)
    if name == "rkl":
        return reduce("rkl", sgo)
    if name == "gkd":
        return reduce("jsd", tgo + sgo)
    if name in ("seqkd", "sft"):
        return reduce("logq_y", tgo, sign=-1.0)
    if name == "dpkd":
        terms = []
        for i in range(num_pairs):
            c, r = rows[i], rows[num_pairs + i]
            if not c or not r:
                continue
            lq_c = np.mean([tok["logq_y"] for tok in c])
            lq_r = np.mean([tok["logq_y"] for tok in r])
            lp_c = np.mean([tok["logp_y"] for tok in c])
            lp_r = np.mean([tok["logp_y"] for tok in r])
            z = beta * ((lq_c - lq_r) - (lp_c - lp_r))
            terms.append(np.log1p(np.exp(-z)))  # -log sigmoid(z)
        return sum(terms) / max(len(terms), 1)
    if name in ("dpo", "ipo"):  # log-prob sums (dpo) or per-token means (ipo); no label smoothing
        terms = []
        for i in range(num_pairs):
            c, r = rows[i], rows[num_pairs + i]
            if not c or not r:
                continue
            agg = np.sum if name == "dpo" else np.mean
            h = ((agg([tok["logq_y"] for tok in c]) - agg([tok["logp_y"] for tok in c]))
                 - (agg([tok["logq_y"] for tok in r]) - agg([tok["logp_y"] for tok in r])))
            terms.append(np.log1p(np.exp(-beta * h)) if name == "dpo" else (h - 1 / (2 * beta)) ** 2)
        return sum(terms) / max(len(terms), 1)
    raise AssertionError(name)


def make_batch(seed, b=B, t=T, v=V, empty_row=None, scale=2.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(2 * b, t, v)) * scale
    te = rng.normal(size=(2 * b, t, v)) * scale
    lab = rng.integers(0, v, size=(2 * b, t))
    for r in range(2 * b):  # prompt of 1..2 tokens, some right padding
        lab[r, : 1 + r % 2] = -100
        if r % 3 == 2:
            lab[r, t - 2:] = -100
    if empty_row is not None:
        lab[empty_row] = -100
    alpha = rng.uniform(0.01, 0.3, size=2 * b)
    return s, te, lab, alpha


def _beta(name):
    return objectives.get(name).default_beta


@functools.partial(jax.jit, static_argnames=("num_pairs",))
def all_objectives(s, t, lab, alpha, num_pairs):
    """Every objective x reduction (+ the authors' normalisation) in one compiled function."""
    out = {}
    for name in NAMES:
        for red in ("sequence", "token"):
            out[f"{name}/{red}"] = objectives.objective(name, s, t, lab, num_pairs=num_pairs,
                                                    alpha=alpha, beta=_beta(name), reduction=red)
    out["distillm2/authors"] = objectives.objective("distillm2", s, t, lab, num_pairs=num_pairs,
                                                alpha=alpha, normalization="authors_code")
    return out


def run_all(s, te, lab, alpha, num_pairs=B):
    return all_objectives(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32),
                          jnp.asarray(lab), jnp.asarray(alpha, jnp.float32), num_pairs)


@pytest.fixture(scope="module")
def batch0():
    s, te, lab, alpha = make_batch(0, empty_row=2)  # row 2 (an SGO row) has no response tokens
    return (s, te, lab, alpha), run_all(s, te, lab, alpha)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(name, reduction, batch0):
    (s, te, lab, alpha), out = batch0
    got, metrics = out[f"{name}/{reduction}"]
    want = ref_objective(name, s, te, lab, B, alpha, _beta(name), reduction)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    assert np.isfinite(float(got))
    assert float(metrics["loss"]) == pytest.approx(float(got))


def test_authors_normalization_is_twice_paper(batch0):
    (s, te, lab, alpha), out = batch0
    authors = float(out["distillm2/authors"][0])
    want = ref_objective("distillm2", s, te, lab, B, alpha, 0.5, "sequence", "authors_code")
    np.testing.assert_allclose(authors, want, rtol=2e-5)
    np.testing.assert_allclose(authors, 2 * float(out["distillm2/sequence"][0]), rtol=1e-6)


def test_metrics_logprobs_and_gaps(batch0):
    (s, te, lab, alpha), out = batch0
    _, m = out["distillm2/sequence"]
    rows = ref_token_terms(s, te, lab, alpha, 0.5)
    lq = np.array([np.mean([t["logq_y"] for t in r]) if r else 0.0 for r in rows])
    lp = np.array([np.mean([t["logp_y"] for t in r]) if r else 0.0 for r in rows])
    np.testing.assert_allclose(m["student_logp_seq"], lq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["teacher_logp_seq"], lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m["tokens_seq"], [len(r) for r in rows])
    assert int(m["num_tokens"]) == sum(len(r) for r in rows)
    gap_t = np.exp(lp[:B]) - np.exp(lq[:B])
    gap_s = np.exp(lq[B:]) - np.exp(lp[B:])
    np.testing.assert_allclose(m["gap_t"], gap_t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["gap_s"], gap_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["gap"], np.concatenate([gap_t, gap_s]), rtol=1e-5, atol=1e-7)
    assert int(m["tokens_seq"][2]) == 0 and np.isfinite(m["gap"]).all()
    valid = np.array([bool(r) for r in rows])
    np.testing.assert_allclose(m["student_logp"], lq[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["teacher_logp"], lp[valid].mean(), rtol=1e-5)
    want_skl = ref_objective("distillm2", s, te, lab, B, alpha, 0.0, "sequence")  # b=0 -> SKL
    np.testing.assert_allclose(m["skl"], want_skl, rtol=2e-5)
    want_srkl = ref_objective("distillm2", s, te, lab, B, alpha, 1.0, "sequence")  # b=1 -> SRKL
    np.testing.assert_allclose(m["srkl"], want_srkl, rtol=2e-5)


def test_padding_length_and_empty_rows(batch0):
    (s, te, lab, alpha), out = batch0
    extra = 5
    rng = np.random.default_rng(9)
    s2 = np.concatenate([s, rng.normal(size=(2 * B, extra, V)) * 5], axis=1)
    te2 = np.concatenate([te, rng.normal(size=(2 * B, extra, V)) * 5], axis=1)
    lab2 = np.concatenate([lab, np.full((2 * B, extra), -100)], axis=1)
    padded = run_all(s2, te2, lab2, alpha)
    for key, (val, _) in out.items():
        assert np.isfinite(float(val)), key
        np.testing.assert_allclose(float(val), float(padded[key][0]), rtol=1e-6, err_msg=key)
    # an all-empty batch: finite (zero) loss and finite metrics
    empty = run_all(s2, te2, np.full_like(lab2, -100), alpha)
    for key, (val, m) in empty.items():
        assert float(val) == 0.0, key
        assert all(np.all(np.isfinite(v)) for v in m.values()), key


# ------------------------------------------------------------------------------------------
# Gradients: float64 central finite differences (directional), restored x64 flag.
# ------------------------------------------------------------------------------------------
# distillm2 is checked under both reductions, the others alternate (compile time).
_FD_REDUCTIONS = {n: ("sequence", "token") if n == "distillm2" else (("sequence", "token")[i % 2],)
                  for i, n in enumerate(NAMES)}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_differences(name):
    with jax.enable_x64(True):
        s, te, lab, alpha = make_batch(4, b=1, t=4, v=5)
        s, te = jnp.asarray(s, jnp.float64), jnp.asarray(te, jnp.float64)
        alpha = jnp.asarray(alpha, jnp.float64)
        rng = np.random.default_rng(5)
        for red in _FD_REDUCTIONS[name]:
            # skew_stopgrad=False: the true derivative (the stop-gradient variant: next test)
            f = jax.jit(lambda x, t_, a_: objectives.objective(
                name, x, t_, lab, num_pairs=1, alpha=a_, reduction=red, skew_stopgrad=False)[0])
            gs, gt, ga = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(s, te, alpha)
            gs = np.asarray(gs)
            assert np.all(np.isfinite(gs)) and np.any(gs)
            for _ in range(3):  # central differences along random directions
                d = rng.normal(size=s.shape)
                eps = 1e-6
                fd = (float(f(s + eps * d, te, alpha))
                      - float(f(s - eps * d, te, alpha))) / (2 * eps)
                np.testing.assert_allclose(np.sum(gs * d), fd, rtol=1e-6, atol=1e-9)
            # teacher and alpha get no gradient
            assert not np.any(np.asarray(gt)) and not np.any(np.asarray(ga))
    assert not jax.config.jax_enable_x64


def test_skew_stopgrad_gradient():
    """With skew_stopgrad=True the SRKL gradient treats the student inside the mixture as a
    constant: it equals the finite-difference derivative of the numpy SRKL with q frozen there."""
    with jax.enable_x64(True):
        s, te, lab, alpha = make_batch(6, b=1, t=4, v=5)
        lab[1, 1:] = np.array([1, 2, 3])  # SGO row fully in response
        f = lambda x: objectives.objective("distillm2", x, jnp.asarray(te), lab, num_pairs=1,  # noqa
                                       alpha=jnp.asarray(alpha), beta=1.0)[0]  # b=1: SRKL only
        g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(s)))

    def frozen(x):  # SGO row, q inside the mixture frozen at s
        vals = []
        for t in range(3):
            q, q0, p = _softmax(x[1, t]), _softmax(s[1, t]), _softmax(te[1, t])
            m = (1 - alpha[1]) * p + alpha[1] * q0
            vals.append(np.sum(q * (np.log(q) - np.log(m))))
        return np.mean(vals)

    eps = 1e-6
    for t in range(3):
        for v in range(5):
            xp, xm = s.copy(), s.copy()
            xp[1, t, v] += eps
            xm[1, t, v] -= eps
            np.testing.assert_allclose(g[1, t, v], (frozen(xp) - frozen(xm)) / (2 * eps),
                                       rtol=1e-5, atol=1e-9)
    assert not np.any(g[0])


# ------------------------------------------------------------------------------------------
# Limits and properties of the per-token divergences.
# ------------------------------------------------------------------------------------------
def test_limits():
    rng = np.random.default_rng(7)
    lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, V)) * 2, jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, V)) * 2, jnp.float32))
    fkl, rkl = divergences.forward_kl(lp, lq), divergences.reverse_kl(lp, lq)
    np.testing.assert_allclose(divergences.skew_kl(lp, lq, 0.0), fkl, rtol=1e-6)
    np.testing.assert_allclose(divergences.skew_reverse_kl(lp, lq, 0.0), rkl, rtol=1e-6)
    np.testing.assert_allclose(divergences.skew_kl(lp, lq, 1e-6), fkl, rtol=1e-4)
    np.testing.assert_allclose(divergences.skew_reverse_kl(lp, lq, 1e-6), rkl, rtol=1e-4)
    np.testing.assert_allclose(divergences.skew_kl(lp, lq, 1.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(divergences.skew_reverse_kl(lp, lq, 1.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(divergences.generalized_jsd(lp, lq, 0.0), fkl, rtol=1e-6)
    np.testing.assert_allclose(divergences.generalized_jsd(lp, lq, 1.0), rkl, rtol=1e-6)
    jsd = jax.jit(divergences.generalized_jsd)  # traced beta takes the jnp.where branch
    np.testing.assert_allclose(jsd(lp, lq, jnp.float32(0.0)), fkl, rtol=1e-6)
    np.testing.assert_allclose(jsd(lp, lq, jnp.float32(1.0)), rkl, rtol=1e-6)
    np.testing.assert_allclose(jsd(lp, lq, jnp.float32(0.9)),
                               divergences.generalized_jsd(lp, lq, 0.9), rtol=1e-6)
    # a -> 0 in the objectives: distillm2 becomes (1-b) KL on TGO + b RKL on SGO, with a
    # finite gradient at a = 0
    s, te, lab, _ = make_batch(8)

    @jax.jit
    def at_zero(x):
        out = []
        for red in ("sequence", "token"):
            kw = dict(num_pairs=B, reduction=red)
            out.append((objectives.objective("distillm2", x, te, lab, alpha=0.0, beta=0.5, **kw)[0],
                        objectives.objective("kd", x, te, lab, **kw)[0],
                        objectives.objective("rkl", x, te, lab, **kw)[0]))
        g = jax.grad(lambda y: objectives.objective("distillm2", y, te, lab, num_pairs=B,
                                                alpha=0.0)[0])(x)
        return out, g

    out, g = at_zero(jnp.asarray(s, jnp.float32))
    for got, kd, rk in out:
        np.testing.assert_allclose(float(got), 0.5 * float(kd) + 0.5 * float(rk), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(g)))


@jax.jit
def _all_divergences(zp, zq, a, b):
    lp, lq = jax.nn.log_softmax(zp), jax.nn.log_softmax(zq)
    return jnp.stack([divergences.forward_kl(lp, lq), divergences.reverse_kl(lp, lq),
                      divergences.skew_kl(lp, lq, a), divergences.skew_reverse_kl(lp, lq, a),
                      divergences.skew_reverse_kl(lp, lq, a, stopgrad=False),
                      divergences.generalized_jsd(lp, lq, b), divergences.total_variation(lp, lq)])


_logits = hnp.arrays(np.float32, (7,), elements=st.floats(-8, 8, width=32))


@settings(max_examples=60, deadline=None)
@given(zp=_logits, zq=_logits, a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_divergences_nonnegative_and_zero_at_equality(zp, zq, a, b):
    d = np.asarray(_all_divergences(zp, zq, np.float32(a), np.float32(b)))
    assert np.all(np.isfinite(d))
    assert np.all(d >= -1e-5), d
    same = np.asarray(_all_divergences(zp, zp, np.float32(a), np.float32(b)))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Argument checking.
# ------------------------------------------------------------------------------------------
def test_errors():
    s, te, lab, alpha = make_batch(10)
    with pytest.raises(ValueError, match="unknown objective .nope."):
        objectives.objective("nope", s, te, lab, num_pairs=B)
    with pytest.raises(ValueError, match="vocab width"):
        objectives.objective("kd", s, te[..., :-1], lab, num_pairs=B)
    with pytest.raises(ValueError, match="alpha"):
        objectives.objective("distillm2", s, te, lab, num_pairs=B, alpha=np.ones(3) * 0.1)
    with pytest.raises(ValueError, match="reduction="):
        objectives.objective("kd", s, te, lab, num_pairs=B, reduction="mean")
    with pytest.raises(ValueError, match="normalization="):
        objectives.objective("kd", s, te, lab, num_pairs=B, normalization="x")
    with pytest.raises(ValueError, match="num_pairs"):
        objectives.objective("kd", s, te, lab, num_pairs=B + 1)
    with pytest.raises(ValueError, match="labels"):
        objectives.objective("kd", s, te, lab[:, :-1], num_pairs=B)
    with pytest.raises(ValueError, match="needs the teacher"):
        objectives.objective("kd", s, None, lab, num_pairs=B)
    val, m = objectives.objective("sft", s, None, lab, num_pairs=B)  # teacher-free objectives
    ref, _ = objectives.objective("sft", s, te, lab, num_pairs=B)
    assert float(val) == pytest.approx(float(ref)) and "teacher_logp" not in m
