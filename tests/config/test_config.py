"""Typed config: defaults, YAML, overrides, one-line errors naming the key, round trip."""
from pathlib import Path

import pytest

from distillm2_jax import config
from distillm2_jax.config import Config, ConfigError
from distillm2_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
MODELS = ["model.teacher=t", "model.student=s"]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("config error: ")
    assert isinstance(exc.value, UserError)
    return message


def write(tmp_path, text, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.model.teacher is None and cfg.tokenizer_path is None
    assert cfg.mesh.shape == [-1, 1, 1]
    assert (cfg.objective.alpha, cfg.objective.alpha_min, cfg.objective.beta) == (0.1, 0.01, 0.5)
    assert cfg.objective.beta_schedule == "paper" and cfg.objective.normalization == "paper"
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule) == (5e-5, 0.1, "cosine")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 128, 0.05)
    assert cfg.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    assert (cfg.generation.temperature, cfg.generation.top_p, cfg.generation.max_new_tokens) == (0.8, 0.95, 1024)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert cfg.train.global_batch == 128 and cfg.train.micro_batch_size == 128 and cfg.train.grad_accum == 1
    assert Config(model={"teacher": "T"}).tokenizer_path == "T"


def test_choices_match_the_modules_that_use_them():
    import typing

    from distillm2_jax import objectives
    from distillm2_jax.objectives import curriculum
    from distillm2_jax.models import decoder, layer

    def choices(section, name):
        return typing.get_args(section.model_fields[name].annotation)

    assert choices(config.ObjectiveSection, "name") == objectives.NAMES
    assert choices(config.ObjectiveSection, "reduction") == objectives.REDUCTIONS
    assert choices(config.ObjectiveSection, "normalization") == objectives.NORMALIZATIONS
    assert choices(config.ObjectiveSection, "beta_schedule") == curriculum.B_SCHEDULES
    assert set(choices(config.ModelSection, "remat")) == set(decoder.REMAT_POLICIES)
    assert config.LORA_TARGETS == layer.LORA_TARGETS


def test_default_yaml_lists_every_key_at_its_default():
    path = REPO / "configs" / "default.yaml"
    cfg = config.load(path)
    expected = Config(model={"teacher": "checkpoints/teacher", "student": "checkpoints/student"})
    assert cfg == expected
    import yaml

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(yaml.safe_load(path.read_text())) == keys(Config().model_dump())


def test_yaml_file_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  teacher: /t\n  student: /s\ntrain:\n  epochs: 5\noptim:\n  lr: 1e-4\n")
    cfg = config.load(path, ["train.epochs=3", "mesh.shape=[2,2,2]", "lora.enabled=true",
                             "model.student=/path/2024", "optim.grad_clip=null", "lora.targets=[q, v]",
                             "train={global_batch: 64, micro_batch: 16}", "model.tokenizer="])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-4  # 1e-4 is a float (YAML 1.2 style)
    assert cfg.mesh.shape == [2, 2, 2] and cfg.lora.enabled is True and cfg.lora.targets == ["q", "v"]
    assert cfg.model.student == "/path/2024" and cfg.model.teacher == "/t"
    assert cfg.optim.grad_clip is None and cfg.model.tokenizer is None
    assert (cfg.train.global_batch, cfg.train.micro_batch, cfg.train.grad_accum) == (64, 16, 4)
    assert cfg.train.log_every == 10  # a section override merges, it does not replace
    # a string field keeps the literal text of a value YAML would read as a number/bool
    assert config.load(None, ["model.teacher=123", "model.student=true"]).model.student == "true"


def test_with_overrides_takes_strings_or_a_mapping_and_returns_a_new_validated_config():
    cfg = Config()
    new = config.with_overrides(cfg, {"train.epochs": 2, "lora": {"enabled": True, "rank": 8}, "seed": 7})
    assert (new.train.epochs, new.lora.enabled, new.lora.rank, new.lora.alpha, new.seed) == (2, True, 8, 128, 7)
    assert cfg.train.epochs == 3 and cfg.lora.enabled is False  # unchanged
    assert config.with_overrides(new, ["optim.lr=2e-5"]).optim.lr == 2e-5
    assert config.with_overrides(new, "optim.lr=2e-5").optim.lr == 2e-5  # one string is one override
    assert config.with_overrides(cfg, {"model": {"student": Path("/a/b")}}).model.student == "/a/b"
    assert config.with_overrides(cfg, {"lora": config.LoraSection(rank=4)}).lora.rank == 4
    msg = error_of(config.with_overrides, cfg, {"train.epochs": "x"})
    assert "train.epochs: expected an integer, got 'x' (from override train.epochs='x')" in msg
    msg = error_of(config.with_overrides, cfg, ["train.micro_batch=3"])
    assert "train.micro_batch: must divide train.global_batch (128), got 3" in msg
    assert "(from override train.micro_batch=3)" in msg
    assert "expected a KEY=VALUE string" in error_of(config.with_overrides, cfg, [("train.epochs", 2)])
    assert "is not a dotted key" in error_of(config.with_overrides, cfg, {"train..epochs": 2})
    # the same overrides give the same Config through `load` and `with_overrides`
    strings = MODELS + ["train={global_batch: 64, micro_batch: 16}", "optim.lr=1e-4"]
    assert config.load(None, strings) == config.with_overrides(Config(), strings)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=fast", "config error: optim.lr: expected a number, got 'fast'"),
    ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5"),
    ("train.epochs=true", "train.epochs: expected an integer, got true"),
    ("lora.enabled=1", "lora.enabled: expected true or false, got 1"),
    ("train.max_steps_per_epoch=x", "train.max_steps_per_epoch: expected an integer or null, got 'x'"),
    ("objective.name=foo", "objective.name: expected one of 'distillm2', 'distillm', 'kd'"),
    ("optim.lr=-1", "optim.lr: must be > 0.0, got -1"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("mesh.shape=3", "mesh.shape: expected a list, got 3"),
    ("mesh.shape=[2, x, 1]", "mesh.shape[1]: expected an integer, got 'x'"),
    ("train=3", "train: expected a section"),
    ("seed.x=1", "seed: is a value, not a section"),
])
def test_wrong_types_name_the_key(override, expected):
    msg = error_of(config.load, None, MODELS + [override])
    assert expected in msg
    assert f"(from override {override})" in msg


def test_unknown_keys_suggest_the_right_one(tmp_path):
    msg = error_of(config.load, None, MODELS + ["train.epohcs=3"])
    assert msg.startswith("config error: unknown key 'train.epohcs' (did you mean 'train.epochs'?)")
    assert "did you mean 'optim.lr'?" in error_of(config.load, None, ["lr=1"])
    assert "did you mean 'optim.lr'?" in error_of(config.load, None, ["train.lr=1"])
    assert "unknown key 'trian' (did you mean 'train'?)" in error_of(config.load, None, ["trian.epochs=1"])
    path = write(tmp_path, "model: {teacher: a, student: b}\noptim:\n  learning_rate: 1\n")
    msg = error_of(config.load, path)
    assert msg.startswith(f"config error: {path}: unknown key 'optim.learning_rate'")
    assert "unknown key 'bogus'" in error_of(Config, bogus=1)


def test_missing_required_model_paths(tmp_path):
    assert error_of(config.load, None) == "config error: model.student: required"
    assert error_of(config.load, None, ["model.student=s"]) == "config error: model.teacher: required"
    cfg = config.load(None, ["model.student=s"], require=False)
    assert "model.teacher: required" in error_of(cfg.validate_paths)
    # teacher-free objectives with precomputed data need no teacher
    config.load(None, ["model.student=s", "objective.name=sft", "data.pairs=p.jsonl"])


@pytest.mark.parametrize("overrides, expected", [
    (["objective.alpha_min=0.2"], "objective.alpha_min: must be <= objective.alpha (0.1), got 0.2"),
    (["objective.alpha=1.5"], "objective.alpha: must be <= 1.0, got 1.5"),
    (["objective.beta=-0.1"], "objective.beta: must be >= 0.0, got -0.1"),
    (["train.global_batch=128", "train.micro_batch=48"],
     "train.micro_batch: must divide train.global_batch (128), got 48"),
    (["mesh.shape=[2, 2]"], "mesh.shape: expected 3 entries (data, fsdp, tensor), got 2"),
    (["mesh.shape=[-1, -1, 2]"], "mesh.shape: at most one entry may be -1"),
    (["mesh.shape=[0, 1, 1]"], "mesh.shape: entries must be positive or -1"),
    (["lora.targets=[q, qkv]"], "lora.targets: unknown target 'qkv' (choose from q, k, v, o, gate, up, down)"),
    (["lora.targets=[q, q]"], "lora.targets: target 'q' is listed twice"),
    (["data.max_prompt_length=1024"],
     "data.max_prompt_length: must be smaller than data.max_length (1024), got 1024"),
])
def test_cross_field_errors(overrides, expected):
    msg = error_of(config.load, None, MODELS + overrides)
    assert expected in msg


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "model: {teacher: a, student: b}\noptim:\n  lr: fast\n")
    assert error_of(config.load, path) == f"config error: {path}: optim.lr: expected a number, got 'fast'"
    # the override wins, and an error in it says so instead of blaming the file
    assert config.load(path, ["optim.lr=1e-3"]).optim.lr == 1e-3
    path = write(tmp_path, "train:\n  global_batch: 128\n  micro_batch: 5\nmodel: {teacher: a, student: b}\n")
    assert error_of(config.load, path).startswith(f"config error: {path}: train.micro_batch: must divide")
    dup = write(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n", "dup.yaml")
    assert error_of(config.load, dup) == f"config error: {dup}: line 3: duplicate key 'epochs'"
    bad = write(tmp_path, "train:\n  epochs: [1\n", "bad.yaml")
    assert error_of(config.load, bad).startswith(f"config error: {bad}: line 3: invalid YAML")
    empty = write(tmp_path, "model: {teacher: a, student: b}\nlora:\n# rank: 8\n", "empty.yaml")
    assert config.load(empty).lora == Config().lora  # an empty section means its defaults
    top = write(tmp_path, "- 1\n", "list.yaml")
    assert "expected a mapping of sections" in error_of(config.load, top)
    assert error_of(config.load, tmp_path / "none.yaml") == f"config error: {tmp_path / 'none.yaml'}: no such file"


def test_bad_override_syntax():
    assert "expected KEY=VALUE" in error_of(config.load, None, ["train.epochs"])
    assert "is not a dotted key" in error_of(config.load, None, ["train..epochs=1"])
    assert "train.epochs: value is not valid YAML" in error_of(config.load, None, ["train.epochs=[1"])


def test_several_errors_on_one_line():
    msg = error_of(config.load, None, MODELS + ["seed=x", "optim.lr=fast"])
    assert "seed: expected an integer" in msg and "optim.lr: expected a number" in msg


def test_validate_paths(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "pairs.jsonl").write_text("")
    base = [f"model.teacher={tmp_path / 't'}", f"model.student={tmp_path / 's'}"]
    cfg = config.load(None, base + [f"data.pairs={tmp_path / 'pairs.jsonl'}", "data.prompts=tfds:x:train"])
    assert cfg.validate_paths() is cfg
    cfg = config.load(None, [f"model.teacher={tmp_path / 't'}", "model.student=/x/y"])
    assert error_of(cfg.validate_paths) == (
        "config error: model.student: /x/y is not a folder (from override model.student=/x/y)")
    path = write(tmp_path, f"model:\n  teacher: {tmp_path / 't'}\n  student: {tmp_path / 'pairs.jsonl'}\n")
    msg = error_of(config.load(path).validate_paths)
    assert msg == f"config error: {path}: model.student: {tmp_path / 'pairs.jsonl'} is not a folder"
    msg = error_of(config.load(None, base + ["data.pairs=/no/pairs.jsonl"]).validate_paths)
    assert "data.pairs: /no/pairs.jsonl is not a file" in msg
    msg = error_of(config.load(None, base + ["data.prompts=/no/prompts.jsonl"]).validate_paths)
    assert "data.prompts: /no/prompts.jsonl does not exist" in msg
    # built in code: paths are not checked until validate_paths()
    cfg = Config(model={"teacher": "/no/t", "student": tmp_path / "s"})
    assert "model.teacher: /no/t is not a folder" in error_of(cfg.validate_paths)


def test_dump_load_round_trip(tmp_path):
    cfg = config.load(None, MODELS + ["mesh.shape=[2,2,2]", "optim.lr=3e-5", "lora.enabled=true",
                                      "lora.targets=[q,v]", "train.micro_batch=32", "optim.grad_clip=null",
                                      "data.prompts=tfds:p:1.0.0:train@/d", "model.student=007"])
    path = config.dump(cfg, tmp_path / "sub" / "config.yaml")
    again = config.load(path)
    assert again == cfg and again.model.student == "007"
    assert config.dumps(again) == config.dumps(cfg)


def test_configs_are_immutable_and_compare_by_value():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.seed = 3
    assert cfg == Config() and cfg != config.with_overrides(cfg, {"seed": 1})
