"""Figure 1(a) of DistiLLM-2: forward KL "pulls up" the head, reverse KL "pushes down" the tail.

Target p = N(x; 0, 4^2) normalised over x = 0, 1.25, ..., 98.75 (80 points); student
q = softmax(theta) with theta initialised to zeros (q uniform); Adam (optax defaults,
lr 0.2) on KL(p || q) and, separately, on KL(q || p), for 5 steps.

From the uniform start, forward KL lifts the head (x < 8) and lowers everything else evenly;
reverse KL lifts the whole region where log q - log p is below KL(q||p) (x < ~55 here, the near
tail included) and cuts the far tail (x >= ~57) hardest. Hence "head" = x < 8 and "far tail" =
x >= 60 in ``head_tail_mass``.

    python experiments/figure1_toy.py --out figure1a.png
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

X = np.arange(80) * 1.25
SIGMA = 4.0
HEAD = X < 2 * SIGMA    # x < 8: where p holds ~95% of its mass
TAIL = X >= 60.0        # far tail, 15 sigma and beyond (the last 32 of the 80 points)


def target_logp() -> np.ndarray:
    """log p over X (float64, computed in log space: p underflows far out in the tail)."""
    logits = -(X ** 2) / (2 * SIGMA ** 2)
    return logits - np.logaddexp.reduce(logits)


def run_toy(steps: int = 5, lr: float = 0.2) -> dict[str, np.ndarray]:
    """Train q = softmax(theta), theta0 = 0, with Adam on forward and on reverse KL.

    Returns {"x", "p", "fkl", "rkl"}: p [80]; fkl / rkl [steps + 1, 80], q after each step
    (row 0 = the uniform initialisation).
    """
    logp = jnp.asarray(target_logp(), jnp.float32)

    def fkl(theta):
        lq = jax.nn.log_softmax(theta)
        return jnp.sum(jnp.exp(logp) * (logp - lq))

    def rkl(theta):
        lq = jax.nn.log_softmax(theta)
        return jnp.sum(jnp.exp(lq) * (lq - logp))

    out = {"x": X, "p": np.exp(target_logp())}
    for name, loss in (("fkl", fkl), ("rkl", rkl)):
        opt = optax.adam(lr)

        @jax.jit
        def step(theta, state, loss=loss, opt=opt):
            g = jax.grad(loss)(theta)
            upd, state = opt.update(g, state, theta)
            return optax.apply_updates(theta, upd), state

        theta = jnp.zeros((X.size,), jnp.float32)
        state = opt.init(theta)
        qs = [np.asarray(jax.nn.softmax(theta))]
        for _ in range(steps):
            theta, state = step(theta, state)
            qs.append(np.asarray(jax.nn.softmax(theta)))
        out[name] = np.stack(qs)
    return out


def head_tail_mass(q: np.ndarray) -> tuple[float, float]:
    """(mass on the head x < 8, mass on the far tail x >= 60) of a distribution over X."""
    return float(q[..., HEAD].sum(-1)), float(q[..., TAIL].sum(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.2)
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = run_toy(args.steps, args.lr)
    hf, tf = head_tail_mass(r["fkl"][-1])
    hr, tr = head_tail_mass(r["rkl"][-1])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, log in zip(axes, (False, True)):
        ax.plot(r["x"], r["p"], "k-", lw=2, label="target p")
        ax.plot(r["x"], r["fkl"][0], "k:", label="initial q (uniform)")
        ax.plot(r["x"], r["fkl"][-1], "C0-o", ms=3, label=f"KL(p||q), {args.steps} Adam steps")
        ax.plot(r["x"], r["rkl"][-1], "C3-s", ms=3, label=f"KL(q||p), {args.steps} Adam steps")
        ax.set_xlabel("x")
        ax.set_ylabel("probability")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.0)
            ax.set_title(f"far tail (x >= 60): KL {tf:.3f}, RKL {tr:.3f}", fontsize=10)
        else:
            ax.set_title(f"head (x < 8): KL {hf:.3f}, RKL {hr:.3f}", fontsize=10)
            ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: head KL {hf:.4f} RKL {hr:.4f}; tail KL {tf:.4f} RKL {tr:.4f}")


if __name__ == "__main__":
    main()
