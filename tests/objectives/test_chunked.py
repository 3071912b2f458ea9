"""The chunked objective equals the unchunked one (values and gradients w.r.t. the student hidden
states and head) for chunk sizes that do and do not divide T, with and without soft-cap, and it
does not build [2B, T, V] buffers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distillm2_jax import objectives

B, T, H, HT, V = 2, 8, 6, 5, 32  # 16 vocab tiles of 2; test_chunked_variants uses V = 37
CAP = 3.0


def _inputs(seed=0, v=V):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    hs, ws, ht, wt = f(2 * B, T, H), f(H, v), f(2 * B, T, HT), f(HT, v)
    lab = rng.integers(0, v, size=(2 * B, T))
    lab[:, :2] = -100
    lab[1, 5:] = -100
    lab[2, :] = -100  # an SGO row with no response tokens
    alpha = jnp.asarray(rng.uniform(0.01, 0.2, size=2 * B), jnp.float32)
    return hs, ws, ht, wt, jnp.asarray(lab), alpha


def _capped(z, c):
    return z if c is None else c * jnp.tanh(z / c)


def _unchunked(name, hs, ws, ht, wt, lab, alpha, cap, reduction, sg=True):
    zs = _capped(jnp.einsum("nth,hv->ntv", hs, ws, preferred_element_type=jnp.float32), cap)
    zt = _capped(jnp.einsum("nth,hv->ntv", ht, wt, preferred_element_type=jnp.float32), cap)
    return objectives.objective(name, zs, zt, lab, num_pairs=B, alpha=alpha, reduction=reduction,
                            skew_stopgrad=sg)


def _chunked(name, hs, ws, ht, wt, lab, alpha, cap, reduction, chunk, mode, sg=True):
    return objectives.chunked_objective(name, hs, ws, ht, wt, lab, num_pairs=B, chunk_size=chunk,
                                    student_softcap=cap, teacher_softcap=cap, alpha=alpha,
                                    reduction=reduction, grad_mode=mode, skew_stopgrad=sg)


# (chunk, softcap, reduction, grad_mode, skew_stopgrad): 4 divides T = 8, 3 and 5 do not.
# distillm2 runs all of them; every other objective (compile time: ~1.5 s per variant) one
# non-dividing chunk with soft-cap, alternating chunk, reduction and grad mode.
CONFIGS = [(4, None, "sequence", "fused", True), (5, CAP, "token", "fused", False),
           (3, CAP, "sequence", "remat", True)]
_OTHERS = [n for n in objectives.NAMES if n != "distillm2"]
PLAN = {"distillm2": CONFIGS}
for _i, _n in enumerate(_OTHERS):
    PLAN[_n] = [(3 + 2 * (_i % 2), CAP, ("token", "sequence")[_i % 2],
                 "remat" if _n == "rkl" else "fused", _i % 2 == 1)]


def _close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-12)
    assert np.max(np.abs(a - b)) / scale < 1e-5, (what, np.max(np.abs(a - b)) / scale)


@pytest.mark.parametrize("name", objectives.NAMES)
def test_chunked_matches_unchunked(name):
    hs, ws, ht, wt, lab, alpha = _inputs()

    @jax.jit
    def run(hs, ws):
        out = []
        for chunk, cap, red, mode, sg in PLAN[name]:
            ref = jax.value_and_grad(
                lambda a, b: _unchunked(name, a, b, ht, wt, lab, alpha, cap, red, sg),
                argnums=(0, 1), has_aux=True)(hs, ws)
            got = jax.value_and_grad(
                lambda a, b: _chunked(name, a, b, ht, wt, lab, alpha, cap, red, chunk, mode, sg),
                argnums=(0, 1), has_aux=True)(hs, ws)
            out.append((ref, got))
        return out

    for cfg, (((v0, m0), g0), ((v1, m1), g1)) in zip(PLAN[name], run(hs, ws)):
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5, err_msg=str(cfg))
        _close(g1[0], g0[0], (cfg, "d hidden"))
        _close(g1[1], g0[1], (cfg, "d head"))
        assert set(m1) == set(m0)
        for k in m0:
            np.testing.assert_allclose(np.asarray(m1[k], np.float64), np.asarray(m0[k], np.float64),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{cfg} {k}")


def test_chunked_variants():
    """Hidden-only and head-only gradients, bf16 inputs, chunk > T, no teacher (sft), and the
    label log-prob pass used by the curriculum; V = 37 (vocab tiles of 3 and a remainder of 1)."""
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731

    @jax.jit
    def run(hs, ws, ht, wt, lab, alpha):
        out = {}
        out["ref"] = jax.value_and_grad(lambda a: _unchunked(
            "distillm2", a, ws, ht, wt, lab, alpha, None, "sequence")[0])(hs)
        out["hidden_only"] = jax.value_and_grad(lambda a: objectives.chunked_objective(
            "distillm2", a, ws, ht, wt, lab, num_pairs=B, chunk_size=16, alpha=alpha)[0])(hs)
        out["head_only"] = jax.grad(lambda b: objectives.chunked_objective(
            "distillm2", hs, b, ht, wt, lab, num_pairs=B, chunk_size=3, alpha=alpha)[0])(ws)
        out["ref_head"] = jax.grad(lambda b: _unchunked(
            "distillm2", hs, b, ht, wt, lab, alpha, None, "sequence")[0])(ws)
        out["bf16"] = jax.value_and_grad(
            lambda a, b: objectives.chunked_objective("distillm2", a, b, bf(ht), bf(wt), lab,
                                                  num_pairs=B, chunk_size=3)[0],
            argnums=(0, 1))(bf(hs), bf(ws))
        out["sft"] = (objectives.chunked_objective("sft", hs, ws, None, None, lab, num_pairs=B,
                                               chunk_size=3)[0],
                      _unchunked("sft", hs, ws, ht, wt, lab, alpha, None, "sequence")[0])
        zs = jnp.einsum("nth,hv->ntv", hs, ws)
        zt = jnp.einsum("nth,hv->ntv", ht, wt)
        out["logprobs"] = (objectives.chunked_sequence_logprobs(hs, ws, ht, wt, lab, chunk_size=3),
                           objectives.sequence_logprobs(zs, zt, lab))
        return out

    out = run(*_inputs(1, v=37))
    (ref_v, ref_g), (v, g) = out["ref"], out["hidden_only"]
    np.testing.assert_allclose(float(v), float(ref_v), rtol=1e-5)
    _close(g, ref_g, "d hidden only")
    _close(out["head_only"], out["ref_head"], "d head only")
    vb, (gh, gw) = out["bf16"]
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16 and np.isfinite(float(vb))
    np.testing.assert_allclose(float(out["sft"][0]), float(out["sft"][1]), rtol=1e-5)
    lp_c, lp_u = out["logprobs"]
    for k in lp_u:
        np.testing.assert_allclose(lp_c[k], lp_u[k], rtol=1e-5, atol=1e-6)


def test_chunked_memory_stays_below_full_logits():
    """XLA's temp allocation of the fused chunked value_and_grad is far below one [2B, T, V]
    float32 buffer (the unchunked path needs several)."""
    n, t, h, v = 4, 256, 32, 8192
    sd = jax.ShapeDtypeStruct
    args = (sd((n, t, h), jnp.float32), sd((h, v), jnp.float32), sd((n, t, h), jnp.float32),
            sd((h, v), jnp.float32), sd((n, t), jnp.int32))

    def chunked(hs, ws, ht, wt, lab):
        return objectives.chunked_objective("distillm2", hs, ws, ht, wt, lab, num_pairs=2,
                                        chunk_size=16)[0]

    def unchunked(hs, ws, ht, wt, lab):
        zs = jnp.einsum("nth,hv->ntv", hs, ws)
        zt = jnp.einsum("nth,hv->ntv", ht, wt)
        return objectives.objective("distillm2", zs, zt, lab, num_pairs=2)[0]

    def temp(f):
        c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        return c.memory_analysis().temp_size_in_bytes

    full = n * t * v * 4
    t_chunked, t_unchunked = temp(chunked), temp(unchunked)
    assert t_unchunked > 2 * full
    assert t_chunked < full / 2, (t_chunked, full)


def test_batch_sharded_moves_no_vocab_sized_data():
    """Under a jit with the rows sharded over 8 devices, the only collectives (unchunked, fused
    and remat paths) are tiny (per-row sums) and the head-gradient all-reduce: TGO and SGO rows
    are told apart by a mask, never by slicing the row axis (a slice moves [rows, C, V] data
    between devices)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    n, t, h, v = 16, 32, 8, 512

    def sd(shape, spec, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    args = (sd((n, t, h), P("data")), sd((h, v), P()), sd((n, t, h), P("data")), sd((h, v), P()),
            sd((n, t), P("data"), jnp.int32))

    def f(hs, ws, ht, wt, lab):
        kw = dict(num_pairs=n // 2)
        zs, zt = jnp.einsum("nth,hv->ntv", hs, ws), jnp.einsum("nth,hv->ntv", ht, wt)
        return (objectives.objective("distillm2", zs, zt, lab, **kw)[0]
                + objectives.chunked_objective("distillm2", hs, ws, ht, wt, lab, chunk_size=8, **kw)[0]
                + objectives.chunked_objective("distillm2", hs, ws, ht, wt, lab, chunk_size=8,
                                           grad_mode="remat", **kw)[0])

    hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile().as_text()
    sizes = {"moves": [], "all-reduce": []}
    for m in re.finditer(r"= \S*?\[([\d,]*)\][^=]*? (all-gather|all-to-all|collective-permute|"
                         r"all-reduce)(?:-start)?\(", hlo):
        size = int(np.prod([int(d) for d in m.group(1).split(",") if d]))
        sizes["all-reduce" if m.group(2) == "all-reduce" else "moves"].append(size)
    assert max(sizes["moves"], default=0) <= n, sizes
    assert max(sizes["all-reduce"], default=0) <= h * v, sizes


def test_chunked_errors():
    hs, ws, ht, wt, lab, alpha = _inputs()
    with pytest.raises(ValueError, match="vocab width"):
        objectives.chunked_objective("kd", hs, ws, ht, wt[:, :-1], lab, num_pairs=B)
    with pytest.raises(ValueError, match="grad_mode="):
        objectives.chunked_objective("kd", hs, ws, ht, wt, lab, num_pairs=B, grad_mode="x")
    with pytest.raises(ValueError, match="chunk_size="):
        objectives.chunked_objective("kd", hs, ws, ht, wt, lab, num_pairs=B, chunk_size=0)
    with pytest.raises(ValueError, match="student_head"):
        objectives.chunked_objective("kd", hs, ws.T, ht, wt, lab, num_pairs=B)
    with pytest.raises(ValueError, match="both be given"):
        objectives.chunked_objective("sft", hs, ws, ht, None, lab, num_pairs=B)


@pytest.mark.parametrize("name,mode", [("distillm2", "fused"), ("dpkd", "fused"), ("kd", "remat")])
def test_chunks_start_at_the_first_label_and_label_free_chunks_are_skipped(name, mode):
    """Prompts 20-23 long and responses ending by position 43 of T = 64: the chunk grid starts at
    the batch's first label, so positions before it and after the last label fill whole
    label-free chunks. NaN hidden states there change nothing - those chunks never run."""
    t, first, last, chunk = 64, 20, 44, 8
    rng = np.random.default_rng(3)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    hs, ws, ht, wt = f(2 * B, t, H), f(H, V), f(2 * B, t, HT), f(HT, V)
    lab = np.full((2 * B, t), -100)
    for row, (p, end) in enumerate([(first, last), (first + 3, last - 4), (first + 1, last), (first, 37)]):
        lab[row, p:end] = rng.integers(0, V, size=end - p)
    alpha = jnp.asarray(rng.uniform(0.01, 0.2, size=2 * B), jnp.float32)
    lab = jnp.asarray(lab)
    # shifted labels live at positions [first - 1, last - 1); everything else is label-free
    outside = np.ones(t, bool)
    outside[first - 1:last - 1] = False
    nan_hs, nan_ht = hs.copy(), ht.copy()
    nan_hs[:, outside] = np.nan
    nan_ht[:, outside] = np.nan

    def grads(fn, a, b, c):
        return jax.value_and_grad(lambda a, b: fn(name, a, b, jnp.asarray(c), wt, lab, alpha, None,
                                                  "sequence")[0], argnums=(0, 1))(a, b)

    ref_val, (ref_dh, ref_dw) = grads(_unchunked, jnp.asarray(hs), jnp.asarray(ws), ht)
    chunked = lambda *a: _chunked(*a, chunk=chunk, mode=mode)  # noqa: E731
    val, (dh, dw) = grads(chunked, jnp.asarray(nan_hs), jnp.asarray(ws), nan_ht)
    _close(val, ref_val, "loss")
    _close(dw, ref_dw, "head grad")
    assert np.all(np.asarray(dh)[:, outside] == 0)
    _close(np.asarray(dh)[:, ~outside], np.asarray(ref_dh)[:, ~outside], "hidden grad")
