"""Figure 1(a) toy: forward KL lifts the head faster, reverse KL cuts the far tail faster."""
import importlib.util
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "figure1_toy.py"
_spec = importlib.util.spec_from_file_location("figure1_toy", _PATH)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def test_figure1_toy():
    r = toy.run_toy(steps=5, lr=0.2)
    assert r["fkl"].shape == (6, 80) and r["rkl"].shape == (6, 80)
    np.testing.assert_allclose(r["p"].sum(), 1.0)
    np.testing.assert_allclose(r["fkl"][0], 1 / 80, rtol=1e-6)  # uniform start
    head_f, tail_f = toy.head_tail_mass(r["fkl"][-1])
    head_r, tail_r = toy.head_tail_mass(r["rkl"][-1])
    head_0, tail_0 = toy.head_tail_mass(r["fkl"][0])
    assert head_f > 2 * head_r and head_r > head_0  # KL pulls the head up much faster
    assert tail_r < 0.5 * tail_f                  # RKL pushes the far tail down much faster
    assert tail_r < tail_0 and tail_f < tail_0
