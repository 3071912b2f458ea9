"""The objective registry: the one list of objectives, and what each one trains on and needs."""
import typing

import pytest

from distillm2_jax import config, objectives


def test_every_list_of_objectives_is_the_registry():
    names = typing.get_args(config.ObjectiveSection.model_fields["name"].annotation)
    assert names == objectives.NAMES


def test_what_each_objective_trains_on_and_needs():
    reg = {n: objectives.get(n) for n in objectives.NAMES}
    assert {n for n, o in reg.items() if not o.student_responses} == {"kd", "seqkd", "sft", "dpo", "ipo"}
    assert {n for n, o in reg.items() if not o.needs_teacher} == {"seqkd", "sft"}
    assert [n for n, o in reg.items() if o.curriculum] == ["distillm2"]
    assert {n: o.beta for n, o in reg.items() if o.beta != "none"} == {
        "distillm2": "schedule", "gkd": "gkd_beta", "dpkd": "dpkd_beta", "dpo": "dpo_beta", "ipo": "dpo_beta"}
    assert {n for n, o in reg.items() if o.reference} == {"dpo", "ipo"}   # the teacher's slot holds a reference
    assert {n: o.options for n, o in reg.items() if o.options} == {"dpo": ("label_smoothing",)}
    for o in reg.values():   # every option is an objective.<key> of the config
        assert set(o.options) <= set(config.ObjectiveSection.model_fields)
    assert len({o.label for o in reg.values()}) == len(reg)    # tables and plots tell them apart
    for o in reg.values():   # a fixed beta names a config key that exists
        assert o.beta in ("none", "schedule") or o.beta in config.ObjectiveSection.model_fields


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown objective 'kl'.*distillm2, distillm, kd"):
        objectives.get("kl")


@pytest.mark.parametrize("name", objectives.NAMES)
def test_each_objective_returns_the_parts_it_declares(name):
    """The record's `parts` are exactly the metrics its loss adds (the trainer sums them across
    micro-batches: `ADDITIVE_METRICS`), and `trained` names the rows its divergence reads."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(4, 6, 9)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 6, 9)), jnp.float32)
    lab = jnp.asarray(np.where(np.arange(6) < 2, -100, rng.integers(0, 9, size=(4, 6))))
    obj = objectives.get(name)
    _, m = objectives.objective(name, s, t, lab, num_pairs=2)
    base = set(objectives.objective("sft", s, None, lab, num_pairs=2)[1]) - {"nll"}
    teacher = {"teacher_logp_seq", "teacher_logp", "teacher_logp_tgo", "teacher_logp_sgo", "gap", "gap_t", "gap_s"}
    assert set(m) - base - teacher == set(obj.parts)
    assert set(obj.parts) <= objectives.ADDITIVE_METRICS
    assert obj.trained in ("tgo", "sgo", "all")
    assert (obj.divergence is None) == (name in ("seqkd", "sft", "dpkd", "dpo", "ipo"))
