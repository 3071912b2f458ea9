"""The shipped run configs (configs/*.yaml) parse, and the paper setups carry the paper's values.

Only the config is read (no model, no path check: the checkpoint paths are placeholders).
Paper values (Ko et al., ICML 2025): "Hyperparameters (paper)", "Setting", "Algorithm 1".
"""
from pathlib import Path

import pytest

from distillm2_jax import config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# file -> (teacher folder, student folder, Algorithm 1 epochs: 3 instruction following, 2 code/math)
PAPER_SETUPS = {
    "qwen2.5-7b_to_1.5b.yaml": ("qwen2.5-7b-instruct", "qwen2.5-1.5b-instruct", 3),
    "mistral-7b_to_danube2-1.8b.yaml": ("mistral-7b-instruct-v0.2", "h2o-danube2-1.8b", 3),
    "gemma2-9b_to_2b.yaml": ("gemma-2-9b-it", "gemma-2-2b-it", 3),
    "deepseek-coder-6.7b_to_1.3b.yaml": ("deepseek-coder-6.7b-instruct", "deepseek-coder-1.3b-instruct", 2),
    "qwen2.5-math-7b_to_1.5b.yaml": ("qwen2.5-math-7b-instruct", "qwen2.5-math-1.5b-instruct", 2),
}


def test_every_paper_setup_has_a_config():
    present = {p.name for p in CONFIGS.glob("*.yaml")}
    assert set(PAPER_SETUPS) <= present, sorted(set(PAPER_SETUPS) - present)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_parses(path):
    # load raises a UserError naming the key on any schema, type or cross-field error
    config.load(path)


@pytest.mark.parametrize("name", sorted(PAPER_SETUPS))
def test_paper_config_values(name):
    teacher, student, epochs = PAPER_SETUPS[name]
    cfg = config.load(CONFIGS / name)
    assert teacher in cfg.model.teacher and student in cfg.model.student
    assert cfg.model.tokenizer is None                      # the teacher's tokenizer
    assert cfg.data.prompts                                 # a prompt source is named
    # the method: CALD with the a curriculum and the paper's b schedule
    o = cfg.objective
    assert o.name == "distillm2"
    assert (o.alpha, o.alpha_min, o.beta) == (0.1, 0.01, 0.5)
    assert o.curriculum and o.beta_schedule == "paper" and o.normalization == "paper"
    assert o.reduction == "sequence"
    # Algorithm 1
    assert cfg.train.epochs == epochs
    assert cfg.generation.regenerate_student
    # "Hyperparameters (paper)": LoRA r=16, alpha=128, dropout 0.05 on all seven projections
    assert cfg.lora.enabled
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 128, 0.05)
    assert cfg.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"]
    # lr 5e-5 cosine with 10% warmup; effective batch 128; bf16
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio) == (5e-5, "cosine", 0.1)
    assert cfg.train.global_batch == 128
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.teacher_dtype == "bfloat16"
    # max length 1024, max prompt length 512
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    # "Setting": temperature 0.8, top-p 0.95, up to 1024 new tokens
    g = cfg.generation
    assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (0.8, 0.95, 0, 1024)
    # one 8-GPU node: micro-batch a multiple of the 8 data-parallel devices
    assert cfg.train.micro_batch_size % 8 == 0


@pytest.mark.parametrize("name", sorted(PAPER_SETUPS))
def test_paper_config_header_has_the_launch_command(name):
    text = (CONFIGS / name).read_text()
    assert f"distillm2 train configs/{name}" in text
    assert "huggingface-cli download" in text
