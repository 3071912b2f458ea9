"""The objective registry: the one list of objectives, and what each one trains on and needs."""
import typing

import pytest

from distillm2_jax import config, losses, objectives


def test_every_list_of_objectives_is_the_registry():
    names = typing.get_args(config.ObjectiveSection.model_fields["name"].annotation)
    assert names == objectives.NAMES == losses.OBJECTIVES


def test_what_each_objective_trains_on_and_needs():
    reg = {n: objectives.get(n) for n in objectives.NAMES}
    assert {n for n, o in reg.items() if not o.student_responses} == {"kd", "seqkd", "sft"}
    assert {n for n, o in reg.items() if not o.needs_teacher} == {"seqkd", "sft"}
    assert [n for n, o in reg.items() if o.curriculum] == ["distillm2"]
    assert {n: o.beta for n, o in reg.items() if o.beta != "none"} == {
        "distillm2": "schedule", "gkd": "gkd_beta", "dpkd": "dpkd_beta"}
    for o in reg.values():   # a fixed beta names a config key that exists
        assert o.beta in ("none", "schedule") or o.beta in config.ObjectiveSection.model_fields


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown objective 'kl'.*distillm2, distillm, kd"):
        objectives.get("kl")
