"""`distillm2 plan` for every paper config (configs/*.yaml): the table of docs/plan.md.

The configs point at checkpoint folders this script does not need: it writes each model's
Hugging Face config.json (the published architecture numbers, below) into MODELS_DIR and
passes model.teacher=... model.student=... overrides. Runs one `distillm2 plan` process at a
time (each compiles 7B-sized programs on fake CPU devices: minutes each) and prints a
Markdown table.

    python benchmarks/plan_paper_configs.py [--models-dir DIR] [--only qwen2.5-7b] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_QWEN = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, max_window_layers=28,
             use_sliding_window=False, attention_dropout=0.0)
# Published config.json values (only the fields the decoder reads).
MODELS = {
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, max_position_embeddings=32768,
                       tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=10000.0,
                            max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen2.5-math-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True),
    "mistral-7b-instruct-v0.2": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                                     max_position_embeddings=32768, tie_word_embeddings=False),
    "h2o-danube2-1.8b": dict(model_type="mistral", vocab_size=32000, hidden_size=2560, intermediate_size=6912,
                             num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                             rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                             max_position_embeddings=8192, tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "deepseek-coder-6.7b": dict(model_type="llama", vocab_size=32256, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                hidden_act="silu", rms_norm_eps=1e-6, rope_theta=100000.0,
                                rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=16384,
                                tie_word_embeddings=False),
    "deepseek-coder-1.3b": dict(model_type="llama", vocab_size=32256, hidden_size=2048, intermediate_size=5504,
                                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                hidden_act="silu", rms_norm_eps=1e-6, rope_theta=100000.0,
                                rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=16384,
                                tie_word_embeddings=False),
}

# config file -> (teacher, student)
PAPER = {
    "qwen2.5-7b_to_1.5b.yaml": ("qwen2.5-7b", "qwen2.5-1.5b"),
    "qwen2.5-math-7b_to_1.5b.yaml": ("qwen2.5-math-7b", "qwen2.5-math-1.5b"),
    "mistral-7b_to_danube2-1.8b.yaml": ("mistral-7b-instruct-v0.2", "h2o-danube2-1.8b"),
    "gemma2-9b_to_2b.yaml": ("gemma-2-9b", "gemma-2-2b"),
    "deepseek-coder-6.7b_to_1.3b.yaml": ("deepseek-coder-6.7b", "deepseek-coder-1.3b"),
}

# (devices, presets): one 8-GPU node; a 16-chip TPU v5e slice and a v4-32 slice (16 chips).
TARGETS = ((8, "h100-80gb,a100-80gb"), (16, "tpu-v5e,tpu-v4"))


def write_models(models_dir: Path) -> None:
    for name, cfg in MODELS.items():
        folder = models_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))


def plan_command(config: str, models_dir: Path, devices: int, hardware: str) -> list[str]:
    teacher, student = PAPER[config]
    return [sys.executable, "-m", "distillm2_jax.cli", "plan", f"configs/{config}",
            f"model.teacher={models_dir / teacher}", f"model.student={models_dir / student}",
            "--devices", str(devices), "--hardware", hardware, "--json"]


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f}"


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| config | hardware x devices | mesh | student | optimizer | teacher | step temp | KV cache | "
            "peak GiB | fits | TFLOP/step | step time | teacher gen tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for config, r in rows:
        gen = next((g for g in r["generation"] if g["model"] == "teacher"), None)
        tok = f"{gen['tokens_per_s']:,.0f}" if gen and gen["tokens_per_s"] else "-"
        lines.append(
            f"| {config.removesuffix('.yaml')} | {r['hardware']} x {r['devices']} | {'x'.join(map(str, r['mesh_shape']))} "
            f"| {_gib(r['params_bytes'])} | {_gib(r['optimizer_bytes'])} | {_gib(r['teacher_bytes'])} "
            f"| {_gib(r['temp_bytes'])} | {_gib(r['kv_cache_bytes'])} | {_gib(r['total_bytes'])} "
            f"| {'yes' if r['fits'] else 'no'} | {r['flops_per_step'] / 1e12:.1f} "
            f"| {r['step_time_s']:.2f} s ({r['step_bound']}) | {tok} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "distillm2-plan-models")
    parser.add_argument("--only", default=None, help="substring of the config names to run")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every row as JSON lines here")
    args = parser.parse_args()
    write_models(args.models_dir)
    rows = []
    for config in PAPER:
        if args.only and args.only not in config:
            continue
        for devices, hardware in TARGETS:
            cmd = plan_command(config, args.models_dir, devices, hardware)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            took = time.perf_counter() - t0
            if proc.returncode:
                print(f"{config} x {devices}: failed ({proc.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
                continue
            print(f"{config} x {devices}: {took:.0f} s", file=sys.stderr)
            for row in json.loads(proc.stdout):
                rows.append((config, row))
                if args.json_out:
                    with args.json_out.open("a") as f:
                        f.write(json.dumps({"config": config, **row}) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
