"""`distillm2 demo`: Algorithm 1 end to end on the embedded task, offline, in minutes on a CPU.

Steps (each prints a line; folders are relative to the output folder, see docs/demo.md):

1. data/: procedural examples: `sft.jsonl` (ground truth for the student's warm-up),
   `prompts.jsonl` (distillation prompts, no answers), `heldout.jsonl` (prompt + answer).
2. student_sft/: the student after a short supervised warm-up (the paper's starting point).
3. runs/distillm2/: DistiLLM-2 with the packaged teacher: teacher responses sampled once,
   student responses re-sampled every epoch, the a curriculum from epoch 2 and the rising b.
4. runs/kd/: the KD baseline (forward KL on the same teacher responses, same budget).
5. student_distillm2/: the DistiLLM-2 student exported as a Hugging Face folder, reloaded
   (with transformers' PyTorch model when torch is installed) and its logits compared.
6. Evaluation on held-out prompts: exact match (greedy), NLL of held-out teacher responses and
   the speculative-decoding acceptance rate of each student as a draft for the teacher.
7. results.md / results.json (the table) and curves.png (training curves of both runs).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from distillm2_jax import api, evaluate, models, objectives
from distillm2_jax.config import Config, with_overrides
from distillm2_jax.data.pairs import build_pairs
from distillm2_jax.demo import assets, report, sft, task
from distillm2_jax.demo.evaluation import task_accuracy
from distillm2_jax.demo.task import MAX_LENGTH, MAX_NEW_TOKENS, MAX_PROMPT_LENGTH
from distillm2_jax.errors import UserError
from distillm2_jax.generation import generate_file
from distillm2_jax.hf import from_pretrained, save_pretrained


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `quick()` is the reduced run the tests use."""
    seed: int = 0
    sft_examples: int = 2000
    sft_steps: int = 300
    sft_lr: float = 3e-3
    distill_prompts: int = 2048
    heldout: int = 200
    epochs: int = 2
    global_batch: int = 16
    lr: float = 1e-3
    temperature: float = 0.8          # the paper's sampling: temperature 0.8, top-p 0.95
    top_p: float = 0.95
    max_new_tokens: int = MAX_NEW_TOKENS
    objectives: tuple[str, ...] = ("distillm2", "kd")

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        base = dict(sft_examples=256, sft_steps=20, distill_prompts=64, heldout=24, global_batch=16)
        base.update(kw)
        return cls(**base)


def _log(msg: str) -> None:
    print(msg, flush=True)


def write_data(out: Path, s: DemoSettings) -> dict[str, Path]:
    """The three data files of the demo (step 1)."""
    d = out / "data"
    return {
        "sft": task.write_jsonl(d / "sft.jsonl", task.make_examples(s.sft_examples, seed=s.seed, split="sft")),
        "prompts": task.write_jsonl(d / "prompts.jsonl",
                                    task.make_examples(s.distill_prompts, seed=s.seed, split="distill"),
                                    with_answers=False),
        "heldout": task.write_jsonl(d / "heldout.jsonl", task.make_examples(s.heldout, seed=s.seed, split="heldout")),
    }


def warm_up_student(out: Path, sft_file: Path, tokenizer, s: DemoSettings, *, progress: bool = True) -> Path:
    """The student after a short supervised warm-up on ground truth (step 2)."""
    records = [json.loads(line) for line in open(sft_file)]
    model = models.from_config(assets.STUDENT_CONFIG, seed=s.seed)
    model, _ = sft.finetune(model, [(r["prompt"], r["solution"]) for r in records], tokenizer, steps=s.sft_steps,
                            batch_size=64, lr=s.sft_lr, warmup=max(s.sft_steps // 10, 1), seed=s.seed,
                            max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, log=None, progress=progress)
    return save_pretrained(model, out / "student_sft", tokenizer=tokenizer)


def train_config(out: Path, s: DemoSettings, objective: str, *, teacher_responses: Path | None = None,
                 run_name: str | None = None, overrides: dict | None = None):
    """The run configuration of one distillation (a `Config`, as `distillm2 train` reads from YAML)."""
    over = {
        "run_dir": str(out / "runs" / (run_name or objective)), "seed": s.seed,
        "model.teacher": str(assets.TEACHER_DIR), "model.student": str(out / "student_sft"),
        "model.teacher_dtype": "float32", "model.compute_dtype": "float32",
        "data.prompts": str(out / "data" / "prompts.jsonl"),
        "data.max_length": MAX_LENGTH, "data.max_prompt_length": MAX_PROMPT_LENGTH,
        "generation.temperature": s.temperature, "generation.top_p": s.top_p,
        "generation.max_new_tokens": s.max_new_tokens, "generation.batch_size": 256,
        # Only objectives that train on the student's responses need them regenerated each epoch.
        "generation.regenerate_student": objectives.get(objective).student_responses,
        "objective.name": objective, "objective.chunk_size": MAX_LENGTH,
        "train.epochs": s.epochs, "train.global_batch": s.global_batch, "train.log_every": 1,
        "optim.lr": s.lr, "optim.warmup_ratio": 0.1,
        "checkpoint.every_steps": 10_000, "checkpoint.async_save": False, "logging.tensorboard": False,
    }
    if teacher_responses is not None:
        over["data.teacher_responses"] = str(teacher_responses)
    over.update(overrides or {})
    return with_overrides(Config(), over)


def heldout_pairs(out: Path, teacher, tokenizer, heldout_file: Path, s: DemoSettings) -> Path:
    """Teacher responses to the held-out prompts, as a pair file (chosen = teacher) with answers."""
    gen = out / "data" / "heldout_teacher.jsonl"
    generate_file(teacher, str(heldout_file), gen, tokenizer=tokenizer, temperature=s.temperature, top_p=s.top_p,
                  max_new_tokens=s.max_new_tokens, max_prompt_length=MAX_PROMPT_LENGTH, seed=s.seed + 1,
                  batch_size=256, progress=False, model_name="teacher")
    pairs = out / "data" / "heldout_pairs.jsonl"
    build_pairs(str(gen), str(gen), str(pairs))
    # Carry the reference answers along, so one file serves every metric of `distillm2 eval`.
    answers = {json.loads(line)["prompt"]: json.loads(line)["answer"] for line in open(heldout_file)}
    rows = [json.loads(line) for line in open(pairs)]
    pairs.write_text("".join(json.dumps({**r, "answer": answers[r["prompt"]]}) + "\n" for r in rows))
    return pairs


def evaluate_model(model, teacher, tokenizer, heldout: list, pairs: Path) -> dict:
    """Exact match, NLL of held-out teacher responses, acceptance rate as the teacher's draft."""
    acc = task_accuracy(model, heldout, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    kw = dict(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, batch_size=64)
    row = {"exact_match": acc["exact_match"], "per_skill": acc["per_skill"], "malformed": acc["malformed"],
           "samples": acc["responses"][:6]}
    if model is teacher:
        nll = evaluate.nll(model, str(pairs), tokenizer, chunk_size=MAX_LENGTH, **kw)
        row.update(nll=nll.nll, tokens=nll.tokens)
    else:  # one pass gives the acceptance and the student's NLL
        ar = evaluate.acceptance_rate(model, teacher, str(pairs), tokenizer, chunk_size=MAX_LENGTH, **kw)
        row.update(nll=ar.draft_nll, tokens=ar.tokens, acceptance=ar.rate, greedy_acceptance=ar.greedy_rate)
    return row


def check_export(export_dir: Path, student, tokenizer) -> dict:
    """Reload the exported folder and compare its logits with the trained student's."""
    ids = np.asarray([tokenizer.apply_chat_template([{"role": "user", "content": "Add: 4785 + 0936"}],
                                                    add_generation_prompt=True)["input_ids"]])
    want = np.asarray(student(ids))
    from transformers import AutoConfig
    AutoConfig.from_pretrained(str(export_dir), local_files_only=True, trust_remote_code=False)
    api.load_tokenizer(export_dir)  # local files only, no remote code, like every tokenizer load
    ours = float(np.max(np.abs(np.asarray(from_pretrained(export_dir)(ids)) - want)))
    result = {"reloaded_max_abs_logit_diff": ours, "transformers_max_abs_logit_diff": None}
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return result
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.as_tensor(ids)).logits.numpy()
    result["transformers_max_abs_logit_diff"] = float(np.max(np.abs(got[..., : want.shape[-1]] - want)))
    return result


def prepare_output(out: Path, *, overwrite: bool) -> Path:
    """An empty output folder; an earlier demo's folder is replaced only with `overwrite`."""
    if out.exists() and any(out.iterdir()):
        if not (out / "data" / "sft.jsonl").is_file():
            raise UserError(f"{out} exists, is not empty and is not a demo output folder; choose another --out")
        if not overwrite:
            raise UserError(f"{out} holds an earlier demo run; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, overwrite: bool = False) -> dict:
    """Run the whole demo into `out`; returns the results dict also written to results.json."""
    s = settings or DemoSettings()
    out = prepare_output(Path(out), overwrite=overwrite)
    if not assets.has_packaged_teacher():
        raise UserError(f"the packaged teacher is missing from {assets.TEACHER_DIR} (an install without "
                        "package data?); reinstall, or rebuild it with experiments/train_demo_teacher.py")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    n = len(s.objectives) + 5
    t0 = time.perf_counter()
    tokenizer = assets.build_tokenizer(out / "tokenizer")
    files = write_data(out, s)
    _log(f"[1/{n}] data: {s.sft_examples} warm-up examples, {s.distill_prompts} distillation prompts, "
         f"{s.heldout} held-out prompts -> {out / 'data'}")
    phase("data", t0)

    t0 = time.perf_counter()
    _log(f"[2/{n}] supervised warm-up of the student ({s.sft_steps} steps) -> {out / 'student_sft'}")
    warm_up_student(out, files["sft"], tokenizer, s)
    phase("warm_up", t0)

    runs = {}
    teacher_file = None
    for i, objective in enumerate(s.objectives):
        t0 = time.perf_counter()
        _log(f"[{3 + i}/{n}] {objective}: {s.epochs} epochs -> {out / 'runs' / objective}")
        cfg = train_config(out, s, objective, teacher_responses=teacher_file)
        runs[objective] = api.train(cfg, log=lambda m: _log("    " + m))
        if teacher_file is None:
            teacher_file = out / "runs" / objective / "data" / "teacher.jsonl"
        phase(f"train_{objective}", t0)

    t0 = time.perf_counter()
    step = 3 + len(s.objectives)
    main = s.objectives[0]
    export_dir = out / f"student_{main}"
    api.export(runs[main].run_dir, export_dir)
    export_check = check_export(export_dir, api.restore_student(runs[main].run_dir), tokenizer)
    diff = export_check["transformers_max_abs_logit_diff"]
    _log(f"[{step}/{n}] exported the {main} student -> {export_dir}; reloaded logits max |diff| "
         f"{export_check['reloaded_max_abs_logit_diff']:.1e}" +
         (f", transformers (PyTorch) {diff:.1e}" if diff is not None else
          " (install torch to also compare with transformers' PyTorch model)"))
    phase("export", t0)

    t0 = time.perf_counter()
    _log(f"[{step + 1}/{n}] evaluating on {s.heldout} held-out prompts")
    teacher = from_pretrained(assets.TEACHER_DIR)
    heldout = task.make_examples(s.heldout, seed=s.seed, split="heldout")
    pairs = heldout_pairs(out, teacher, tokenizer, files["heldout"], s)
    rows = {"teacher": evaluate_model(teacher, teacher, tokenizer, heldout, pairs),
            "student (warm-up only)": evaluate_model(from_pretrained(out / "student_sft"), teacher,
                                                     tokenizer, heldout, pairs)}
    for objective in s.objectives:
        rows[f"student after {report.label(objective)}"] = evaluate_model(
            api.restore_student(runs[objective].run_dir), teacher, tokenizer, heldout, pairs)
    phase("evaluate", t0)

    t0 = time.perf_counter()
    png = report.plot_curves({o: r.run_dir for o, r in runs.items()}, out / "curves.png")
    phase("report", t0)
    results = {"settings": dataclasses.asdict(s), "rows": rows, "export": export_check,
               "timings_s": timings, "wall_s": round(time.perf_counter() - t_start, 1),
               "files": {"curves": str(png), "export": str(export_dir)}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.table(rows)
    (out / "results.md").write_text(report.markdown(results, table))
    _log(f"[{n}/{n}] results -> {out / 'results.md'}, curves -> {png}\n")
    _log(table)
    _log(f"\nwall time {results['wall_s']:.0f} s")
    return results
