"""Typed run configuration: the schema, YAML files and `key=value` overrides.

    from distillm2_jax import config
    cfg = config.load("configs/default.yaml", ["train.epochs=2", "mesh.shape=[2,2,2]"])
    cfg = config.with_overrides(cfg, {"optim.lr": 1e-5, "lora": {"enabled": True}})  # a new Config
    cfg.validate_paths()                                                          # folders/files exist
    config.dump(cfg, "runs/x/config.yaml")

Modules (one job each): schema (the pydantic sections and their checks), loading (YAML files,
overrides, dumps), errors (one-line ConfigError naming the key and where its value came from).
Every problem raises `ConfigError` (a `UserError`), e.g.
`config error: optim.lr: expected a number, got 'fast'`. See docs/config.md for every key.
"""
from distillm2_jax.config.errors import ConfigError
from distillm2_jax.config.loading import Overrides, dump, dumps, load, parse_override, with_overrides
from distillm2_jax.config.schema import (
    LORA_TARGETS,
    MESH_AXES,
    CheckpointSection,
    Config,
    DataSection,
    DistributedSection,
    GenerationSection,
    LoggingSection,
    LoraSection,
    MeshSection,
    ModelSection,
    ObjectiveSection,
    OptimSection,
    TrainSection,
)

__all__ = [
    "CheckpointSection", "Config", "ConfigError", "DataSection", "DistributedSection", "GenerationSection",
    "LORA_TARGETS", "LoggingSection", "LoraSection", "MESH_AXES", "MeshSection", "ModelSection",
    "ObjectiveSection", "OptimSection", "Overrides", "TrainSection", "dump", "dumps", "load",
    "parse_override", "with_overrides",
]
