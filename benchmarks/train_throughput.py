"""Tokens/s of one full DistiLLM-2 distillation step: this project's JAX trainer step vs the
authors' way (PyTorch Hugging Face models, full [2B, T, V] float32 logits), on CPU.

One step, both sides: teacher forward on both halves of the pair batch (rows [0:B] TGO, [B:2B]
SGO, one concatenated forward), student forward and backward, the CALD loss
(2 - b_c) * SKL_a (TGO rows) + b_c * SRKL_a (SGO rows), per-sequence token means, then
global-norm clipping at 1.0 and an AdamW update (lr 5e-5, cosine with 10% warm-up, no weight
decay: the project's defaults, which are also HF Trainer's).

* ours: `distillm2_jax.train.step.train_step` jitted as `Trainer.compile_step` does (explicit
  shardings on a one-device mesh, donated state), on the same pairs in the trainer's
  shared-prompt layout (each pair's prompt runs once through each model; `models.forward_pairs`),
  `objective="distillm2"`,
  `normalization="authors_code"` (the same loss value as theirs), chunked fused loss (no
  [2B, T, V] array). The step is compiled with the curriculum present (`curriculum=True`, as a
  default run is); "curriculum off" is the epoch-1 step (`curriculum_on=False`, fixed a0),
  "on" the epoch >= 2 step (per-row a: one extra forward pass of the student's head for the
  gaps, with the teacher's per-sequence log-probs given, as the trainer computes them once per
  epoch).
* theirs: `AutoModelForCausalLM.from_config` with the SAME configs, teacher under
  `torch.no_grad()`, `.logits` of both halves in float32, log-softmax, SKL/SRKL with the
  mixtures in probability space (a*p + (1-a)*q, student stop-gradient inside the SRKL mixture),
  `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`, scheduler step,
  `zero_grad()`; `torch.set_num_threads(2)`; fixed a = 0.1 (the released code never turns the
  curriculum on).

Each side runs in its own subprocess (peak RSS from `resource.getrusage` is then per side), and
the two are driven one step at a time in alternating rounds (never concurrently): on a shared
machine a load change then hits both sides alike. Tokens/s = 2B * T / step time, i.e. every
row token processed (prompt tokens included), median over the timed rounds after warm-up.
"paired" is the median over rounds of theirs / ours within the same round, which cancels most of
a load change on a shared host.
The JAX compile time is excluded from tokens/s and printed on its own.

Before timing, a correctness check runs both sides on tiny models with the SAME weights (the
torch models are saved as a HF folder and loaded by the project) and compares the loss over 3
optimizer steps, so the two sides are known to compute the same objective.

    python benchmarks/train_throughput.py                  # default: 2 pairs x T=512, float32
    python benchmarks/train_throughput.py --bf16           # also bfloat16 compute (both sides)
    python benchmarks/train_throughput.py --profile        # also a per-piece time breakdown
    python benchmarks/train_throughput.py --tiny --rounds 2   # smoke test with tiny models
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK = "@@BENCH "
IGNORE = -100
ALPHA = 0.1          # a0 (fixed skew; epoch-1 step)
BETA = 0.5           # paper b; the authors' code uses b_c = 2 b
REF_GAP = 0.01       # curriculum reference m used for the "curriculum on" step


# ------------------------------------------------------------------------------------------------
# Model configurations (Qwen2 family, untied heads, GQA like Qwen2.5)
# ------------------------------------------------------------------------------------------------
def model_configs(tiny: bool, seq: int) -> tuple[dict, dict]:
    common = dict(model_type="qwen2", vocab_size=32000, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=max(seq, 512),
                  attention_dropout=0.0, use_sliding_window=False)
    if tiny:
        common["vocab_size"] = 512
        student = dict(common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
        teacher = dict(common, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
        return student, teacher
    student = dict(common, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2)
    teacher = dict(common, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=4)
    return student, teacher


def make_batch(pairs: int, seq: int, prompt: int, vocab: int, seed: int = 0):
    """[2B, T] ids, mask (all ones) and labels (-100 on the prompt), numpy int64."""
    import numpy as np
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    ids = rng.integers(3, vocab, (rows, seq)).astype(np.int64)
    # rows b and B + b share their prompt (a pair), responses differ
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    mask = np.ones((rows, seq), np.int64)
    labels = ids.copy()
    labels[:, :prompt] = IGNORE
    return ids, mask, labels


def shared_prompt_batch(ids, pairs: int, prompt: int) -> dict:
    """The same pairs collated as the trainer's loader does (`collate_shared_prompts`): each
    prompt stored once (rows b and B + b share theirs), responses [B, 2, T - P]."""
    from distillm2_jax.data.batches import TokenizedPair, collate_shared_prompts

    tokenized = [TokenizedPair(ids[b, :prompt], ids[b, prompt:], ids[pairs + b, prompt:]) for b in range(pairs)]
    return collate_shared_prompts(tokenized, max_prompt_length=prompt, max_response_length=ids.shape[1] - prompt,
                                  pad_id=0)


def emit(event: str, **data) -> None:
    print(MARK + json.dumps({"event": event, **data}), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# Worker: theirs (PyTorch + transformers, the authors' step semantics)
# ------------------------------------------------------------------------------------------------
def authors_distillm2_loss(student_logits, teacher_logits, labels, num_pairs: int, alpha: float,
                           beta_c: float):
    """The authors' DistiLLM-2 loss on full logits [2B, T, V] (written from paper.md).

    SKL_a(p||q) = KL(p || a p + (1-a) q) on TGO rows, SRKL_a(p||q) = KL(q || (1-a) p + a sg(q))
    on SGO rows; mixtures in probability space; per-token sums over the vocab, per-sequence means
    over response tokens, mean over pairs; (2 - b_c) * SKL + b_c * SRKL.
    """
    import torch
    import torch.nn.functional as F

    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    lab = labels[:, 1:]
    mask = (lab != IGNORE).float()
    lq = F.log_softmax(s, dim=-1)
    lp = F.log_softmax(t, dim=-1)
    q = lq.exp()
    p = lp.exp()
    b = num_pairs
    mix_t = alpha * p[:b] + (1.0 - alpha) * q[:b]
    skl_tok = (p[:b] * (lp[:b] - torch.log(mix_t))).sum(-1)
    mix_s = (1.0 - alpha) * p[b:] + alpha * q[b:].detach()
    srkl_tok = (q[b:] * (lq[b:] - torch.log(mix_s))).sum(-1)
    denom = mask.sum(-1).clamp(min=1.0)
    skl = ((skl_tok * mask[:b]).sum(-1) / denom[:b]).mean()
    srkl = ((srkl_tok * mask[b:]).sum(-1) / denom[b:]).mean()
    loss = (2.0 - beta_c) * skl + beta_c * srkl
    # TRL-style logged metrics: per-sequence label log-probs (chosen / rejected)
    with torch.no_grad():
        idx = lab.clamp(min=0).unsqueeze(-1)
        logps = (lq.gather(-1, idx).squeeze(-1) * mask).sum(-1) / denom
    return loss, {"skl": skl.detach(), "srkl": srkl.detach(), "logps": logps}


def theirs_worker(spec: dict) -> None:
    import torch
    torch.set_num_threads(2)
    from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(spec["seed"])
    dtype = spec["dtype"]
    t0 = time.perf_counter()
    models = {}
    for name in ("student", "teacher"):
        cfg = dict(spec[name])
        model_type = cfg.pop("model_type")
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        models[name] = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    student, teacher = models["student"], models["teacher"]
    if spec.get("save_dir"):
        for name, m in models.items():
            m.save_pretrained(str(Path(spec["save_dir"]) / name))
    student.train()
    teacher.eval()
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    if spec["schedule"] == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        sched = get_cosine_schedule_with_warmup(opt, int(0.1 * spec["total_steps"]), spec["total_steps"])
    ids, mask, labels = make_batch(spec["pairs"], spec["seq"], spec["prompt"], spec["student"]["vocab_size"])
    ids, mask, labels = (torch.from_numpy(x) for x in (ids, mask, labels))
    pairs = spec["pairs"]
    beta_c = 2.0 * BETA
    autocast = dtype == "bfloat16"

    def forward(model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, attention_mask=mask).logits

    def step():
        with torch.no_grad():
            t_logits = forward(teacher)
        s_logits = forward(student)
        loss, _ = authors_distillm2_loss(s_logits, t_logits, labels, pairs, ALPHA, beta_c)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    emit("ready", setup_s=time.perf_counter() - t0, compile_s=None, params_student=n_s,
         params_teacher=n_t, torch_threads=torch.get_num_threads(),
         attn_impl=student.config._attn_implementation)

    def profile():
        """Time each piece of the step (each after one warm-up)."""
        def timed(fn, reps=2):
            fn()
            out = []
            for _ in range(reps):
                a = time.perf_counter()
                fn()
                out.append(time.perf_counter() - a)
            return min(out)
        res = {}
        with torch.no_grad():
            res["teacher forward (logits)"] = timed(lambda: forward(teacher))
            t_logits = forward(teacher)
            res["student forward only (logits)"] = timed(lambda: forward(student))
        s_leaf = forward(student).detach().requires_grad_(True)

        def loss_fwd():
            with torch.no_grad():
                authors_distillm2_loss(s_leaf, t_logits, labels, pairs, ALPHA, beta_c)
        res["loss forward (from logits)"] = timed(loss_fwd)

        def loss_fwd_bwd():
            loss, _ = authors_distillm2_loss(s_leaf, t_logits, labels, pairs, ALPHA, beta_c)
            loss.backward()
            s_leaf.grad = None
        res["loss forward+backward (from logits)"] = timed(loss_fwd_bwd)
        g = torch.randn_like(s_leaf) * 1e-6

        def student_fwd_bwd():
            out = forward(student)
            out.backward(g)
            student.zero_grad(set_to_none=True)
        res["student forward+backward (logits cotangent given)"] = timed(student_fwd_bwd)
        out = forward(student)
        out.backward(g)

        def opt_step():
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
        res["clip + AdamW update"] = timed(opt_step)
        opt.zero_grad(set_to_none=True)
        return res

    serve({"step": lambda flag: step(), "profile": profile})


# ------------------------------------------------------------------------------------------------
# Worker: ours (the project's train_step, jitted like Trainer.compile_step)
# ------------------------------------------------------------------------------------------------
def ours_worker(spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from distillm2_jax import models, objectives
    from distillm2_jax import sharding as shd
    from distillm2_jax.config import OptimSection
    from distillm2_jax.hf import from_pretrained
    from distillm2_jax.models import decoder
    from distillm2_jax.train.optimizer import make_optimizer
    from distillm2_jax.train.batch import loss_labels, micro_batches, shardings, to_global
    from distillm2_jax.train.step import (StepConfig, StepInputs, TrainState, pair_hidden,
                                          teacher_sequence_logprobs, train_step)

    t0 = time.perf_counter()
    mesh = shd.make_mesh((-1, 1, 1))
    if spec.get("load_dir"):
        student = from_pretrained(Path(spec["load_dir"]) / "student", dtype=jnp.float32, mesh=mesh)
        teacher = from_pretrained(Path(spec["load_dir"]) / "teacher", dtype=jnp.float32, mesh=mesh)
    else:
        student = models.from_config(spec["student"], seed=spec["seed"], dtype=jnp.float32, mesh=mesh)
        teacher = models.from_config(spec["teacher"], seed=spec["seed"] + 1, dtype=jnp.float32, mesh=mesh)
    cfg = StepConfig(student=student.config, teacher=teacher.config, objective="distillm2",
                     alpha=ALPHA, alpha_min=0.01, curriculum=True, skew_stopgrad=True,
                     reduction="sequence", normalization="authors_code", chunk_size=spec["chunk"],
                     compute_dtype=spec["dtype"], remat="none")
    optim = OptimSection(lr=spec["lr"], schedule=spec["schedule"],
                         warmup_ratio=0.0 if spec["schedule"] == "constant" else 0.1)
    tx, _ = make_optimizer(optim, spec["total_steps"])
    trainable, frozen, teacher_params = student.params(), {}, teacher.params()
    state = jax.jit(lambda t: TrainState(step=jnp.zeros((), jnp.int32), trainable=t, opt_state=tx.init(t)))(trainable)
    del trainable
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(mesh, P())

    def step(state, frozen, teacher, batch, inputs):
        return train_step(state, frozen, teacher, micro_batches(batch, 1, mesh), inputs, cfg=cfg, tx=tx)

    step_jit = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen),
                                           jax.tree.map(lambda x: x.sharding, teacher_params),
                                           shardings(mesh), replicated),
                       out_shardings=(state_sh, replicated), donate_argnums=(0,))
    ids, _, _ = make_batch(spec["pairs"], spec["seq"], spec["prompt"], spec["student"]["vocab_size"])
    batch = to_global(shared_prompt_batch(ids, spec["pairs"], spec["prompt"]), mesh)

    # The teacher's per-sequence log-probs, which the trainer computes once per epoch (with m) and
    # passes to every step of the epoch: the step's curriculum gap pass runs the student's head only.
    teacher_logps = jax.jit(lambda tp, b: teacher_sequence_logprobs(tp, micro_batches(b, 1, mesh), cfg=cfg),
                            out_shardings=replicated)(teacher_params, batch)
    no_teacher_logps = jnp.zeros_like(teacher_logps)

    def inputs_for(i: int, on: bool) -> StepInputs:
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(0), i))
        return StepInputs(jnp.float32(BETA), jnp.float32(REF_GAP), key, jnp.bool_(on),
                          teacher_logps if on else no_teacher_logps)

    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step_jit.lower(state, frozen, teacher_params, batch, inputs_for(0, False)).compile()
    compile_s = time.perf_counter() - t0
    counter = [0]

    def run(flag: str):
        nonlocal state
        state, metrics = compiled(state, frozen, teacher_params, batch, inputs_for(counter[0], flag == "on"))
        counter[0] += 1
        return float(metrics["loss"])

    n_s = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(student.params()))
    n_t = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher_params))
    emit("ready", setup_s=setup_s, compile_s=compile_s, params_student=n_s, params_teacher=n_t,
         num_params_student=student.config.num_params(), num_params_teacher=teacher.config.num_params(),
         devices=str(jax.devices()), torch_loaded="torch" in sys.modules)

    def profile():
        """Time each piece of the step as its own jitted function (each after a compile run)."""
        dtype = spec["dtype"]
        micro = jax.tree.map(lambda x: x[0], jax.jit(lambda b: micro_batches(b, 1, mesh))(batch))
        lab2 = loss_labels(micro.labels)
        sp = state.trainable
        scfg, tcfg = cfg.student, cfg.teacher

        def timed(fn, *args, reps=2):
            jax.block_until_ready(fn(*args))
            out = []
            for _ in range(reps):
                a = time.perf_counter()
                jax.block_until_ready(fn(*args))
                out.append(time.perf_counter() - a)
            return min(out)

        res = {}
        t_hidden = jax.jit(lambda tp: pair_hidden(tp, tcfg, micro, compute_dtype=dtype))
        res["teacher forward (hidden states)"] = timed(t_hidden, teacher_params)
        s_hidden = jax.jit(lambda p: pair_hidden(p, scfg, micro, compute_dtype=dtype))
        res["student forward only (hidden states)"] = timed(s_hidden, sp)
        ht = t_hidden(teacher_params)
        hs = s_hidden(sp)
        ws = decoder.output_head(sp, scfg)
        wt = decoder.output_head(teacher_params, tcfg)

        def loss_of(hs, ws):
            return objectives.chunked_objective(
                "distillm2", hs, ws, ht, wt, lab2, num_pairs=spec["pairs"], chunk_size=spec["chunk"],
                alpha=ALPHA, beta=BETA, normalization="authors_code")[0]
        res["loss forward (chunked, from hidden)"] = timed(jax.jit(loss_of), hs, ws)
        res["loss forward+backward (chunked, fused vjp)"] = timed(
            jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1))), hs, ws)
        ct = jax.random.normal(jax.random.key(1), hs.shape, hs.dtype) * 1e-6

        def body_fwd_bwd(p):
            return jax.grad(lambda p: jnp.vdot(pair_hidden(p, scfg, micro, compute_dtype=dtype)
                                               .astype(jnp.float32), ct))(p)
        res["student body forward+backward (hidden cotangent given)"] = timed(jax.jit(body_fwd_bwd), sp)
        grads = jax.tree.map(lambda x: x * 1e-3, sp)

        def update(p, o, g):
            import optax
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o
        res["clip + AdamW update (optax)"] = timed(jax.jit(update), sp, state.opt_state, grads)
        seq = jax.jit(lambda hs, ws: objectives.chunked_sequence_logprobs(hs, ws, None, None, lab2, chunk_size=spec["chunk"]))
        res["curriculum gap pass (on only; student head)"] = timed(seq, hs, ws)
        both = jax.jit(lambda hs, ws: objectives.chunked_sequence_logprobs(hs, ws, ht, wt, lab2, chunk_size=spec["chunk"]))
        res["curriculum gap pass, both heads (not run: the teacher's values are per epoch)"] = timed(both, hs, ws)
        return res

    serve({"step": run, "profile": profile})


def serve(handlers: dict) -> None:
    """Read commands from stdin: `step <flag>`, `profile`, `quit`; answer with MARK lines."""
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            loss = handlers["step"](cmd[1] if len(cmd) > 1 else "off")
            emit("step", dt=time.perf_counter() - t0, cpu=time.process_time() - c0, loss=loss)
        elif cmd[0] == "profile":
            emit("profile", pieces=handlers["profile"]())
        elif cmd[0] == "quit":
            emit("done", peak_rss_mb=peak_rss_mb())
            return


# ------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, label: str, side: str, spec: dict):
        self.label, self.side = label, side
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, "--_worker", side, "--_spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env, cwd=str(ROOT))
        self.info = self._read("ready")
        self.times: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.losses: dict[str, list[float]] = {}

    def _read(self, event: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                msg = json.loads(line[len(MARK):])
                if msg["event"] != event:
                    raise RuntimeError(f"{self.label}: expected {event}, got {msg}")
                return msg
            sys.stderr.write(line)
        raise RuntimeError(f"{self.label}: worker exited (rc={self.proc.wait()}) before '{event}'")

    def step(self, flag: str = "off", record: bool = True) -> float:
        self.proc.stdin.write(f"step {flag}\n")
        self.proc.stdin.flush()
        msg = self._read("step")
        if record:
            self.times.setdefault(flag, []).append(msg["dt"])
            self.cpu.setdefault(flag, []).append(msg["cpu"])
        self.losses.setdefault(flag, []).append(msg["loss"])
        return msg["dt"]

    def profile(self) -> dict:
        self.proc.stdin.write("profile\n")
        self.proc.stdin.flush()
        return self._read("profile")["pieces"]

    def close(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        rss = self._read("done")["peak_rss_mb"]
        self.proc.wait()
        return rss


def fmt_t(ts: list[float]) -> str:
    return f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})"


def run_check(args) -> None:
    """Same weights, tiny models: the loss of both sides over 3 steps must agree."""
    s_cfg, t_cfg = model_configs(True, 64)
    common = dict(student=s_cfg, teacher=t_cfg, pairs=2, seq=64, prompt=16, seed=0, lr=1e-3,
                  schedule="constant", total_steps=10, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        theirs = Worker("check-theirs", "theirs", dict(common, save_dir=tmp))
        ours = Worker("check-ours", "ours", dict(common, load_dir=tmp, chunk=16))
        for _ in range(3):
            theirs.step()
            ours.step()
        theirs.close()
        ours.close()
    lt, lo = theirs.losses["off"], ours.losses["off"]
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(lt, lo))
    print(f"check (tiny Qwen2 models, same weights, 2 pairs x T=64, lr 1e-3, 3 steps): "
          f"loss theirs {', '.join(f'{x:.6f}' for x in lt)} | ours {', '.join(f'{x:.6f}' for x in lo)} "
          f"| max rel diff {rel:.1e} -> {'OK' if rel < 1e-4 else 'MISMATCH'}")
    if rel >= 1e-4:
        raise SystemExit("the two sides do not compute the same loss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="pairs B per step (2B rows; default 2)")
    ap.add_argument("--seq", type=int, default=512, help="T, tokens per row (default 512)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (labels -100; default 128)")
    ap.add_argument("--rounds", type=int, default=4, help="timed steps per row after 1 warm-up (default 4)")
    ap.add_argument("--chunks", default="128,256,512",
                    help="chunk sizes of our loss; the first is the main row, timed beside theirs, the others "
                         "are timed in a second phase (default 128,256,512)")
    ap.add_argument("--no-curriculum-on", action="store_true", help="skip the curriculum-on (epoch >= 2) step")
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute on both sides")
    ap.add_argument("--profile", action="store_true", help="also print a per-piece time breakdown")
    ap.add_argument("--no-check", action="store_true", help="skip the same-weights loss check")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        spec = json.loads(args._spec)
        (theirs_worker if args._worker == "theirs" else ours_worker)(spec)
        return 0

    s_cfg, t_cfg = model_configs(args.tiny, args.seq)
    chunks = [int(c) for c in args.chunks.split(",")]
    tokens = 2 * args.pairs * args.seq
    base = dict(student=s_cfg, teacher=t_cfg, pairs=args.pairs, seq=args.seq, prompt=args.prompt, seed=0,
                lr=5e-5, schedule="cosine", total_steps=1000)
    print(f"command: python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"student: qwen2 hidden {s_cfg['hidden_size']} x {s_cfg['num_hidden_layers']} layers, "
          f"intermediate {s_cfg['intermediate_size']}, heads {s_cfg['num_attention_heads']}/"
          f"{s_cfg['num_key_value_heads']} kv | teacher: hidden {t_cfg['hidden_size']} x "
          f"{t_cfg['num_hidden_layers']} layers, intermediate {t_cfg['intermediate_size']}, heads "
          f"{t_cfg['num_attention_heads']}/{t_cfg['num_key_value_heads']} kv | vocab {s_cfg['vocab_size']}, "
          f"untied heads, float32 params")
    print(f"batch: {args.pairs} pairs = {2 * args.pairs} rows x T={args.seq} (prompt {args.prompt}, "
          f"response {args.seq - args.prompt}) -> {tokens} row tokens/step; a={ALPHA}, b={BETA} (b_c={2 * BETA}); "
          f"{args.rounds} timed rounds after 1 warm-up; host: {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.2f} at start")
    if not args.no_check:
        run_check(args)

    def phase(theirs_dtype, ours_specs):
        """Spawn the workers, warm each row up once, then time `rounds` rounds, one step per row
        per round in turn (never two at once). ours_specs: [(name prefix, spec, flags)]."""
        workers = []
        if theirs_dtype:
            tag = "autocast bf16" if theirs_dtype == "bfloat16" else "fp32"
            workers.append((f"theirs (torch {tag})", Worker(f"theirs {theirs_dtype}", "theirs",
                                                            dict(base, dtype=theirs_dtype)), ["off"]))
        for name, spec, flags in ours_specs:
            workers.append((name, Worker(name, "ours", dict(base, **spec)), flags))
        for _, w, flags in workers:
            for f in flags:
                w.step(f, record=False)
        for _ in range(args.rounds):
            for _, w, flags in workers:
                for f in flags:
                    w.step(f)
        prof = None
        if args.profile and theirs_dtype:
            prof = {"theirs": workers[0][1].profile(), "ours": workers[1][1].profile()}
        rows = []
        for name, w, flags in workers:
            rss = w.close()
            for f in flags:
                label = name if w.side == "theirs" else name + (
                    ", curriculum off (epoch 1)" if f == "off" else ", curriculum on (epoch>=2)")
                rows.append((label, w, f, rss))
        return rows, prof

    on = [] if args.no_curriculum_on else ["on"]
    phases = []  # (title, rows, reference theirs worker, profile)
    main_specs = [(f"ours chunk {chunks[0]}", dict(dtype="float32", chunk=chunks[0]), ["off"] + on)]
    rows, prof = phase("float32", main_specs)
    phases.append(("float32: theirs and ours interleaved", rows, rows[0][1], prof))
    if len(chunks) > 1:
        rows, _ = phase(None, [(f"ours chunk {c}", dict(dtype="float32", chunk=c), ["off"]) for c in chunks[1:]])
        phases.append((f"float32, chunk sweep (own phase; ratio against the theirs median above)", rows,
                       phases[0][2], None))
    if args.bf16:
        rows, prof = phase("bfloat16", [(f"ours chunk {chunks[0]} bf16", dict(dtype="bfloat16", chunk=chunks[0]),
                                         ["off"])])
        phases.append(("bfloat16 compute (float32 params): theirs and ours interleaved", rows, rows[0][1], prof))

    print()
    hdr = (f"{'side':<62} {'params student/teacher':>22} {'tok/step':>8} {'compile s':>9} "
           f"{'step s median (min-max)':>24} {'CPU s/step':>10} {'tok/s':>6} {'ours/theirs':>11} {'paired':>6} "
           f"{'peak RSS MB':>11}")
    print(hdr)
    print("-" * len(hdr))
    for title, rows, ref, _ in phases:
        print(f"[{title}]")
        theirs_tps = tokens / statistics.median(ref.times["off"])
        for name, w, flag, rss in rows:
            ts = w.times[flag]
            tps = tokens / statistics.median(ts)
            info = w.info
            comp = "-" if info["compile_s"] is None else f"{info['compile_s']:.1f}"
            params = f"{info['params_student'] / 1e6:.2f}M/{info['params_teacher'] / 1e6:.2f}M"
            ratio = "1.00x" if w is ref else f"{tps / theirs_tps:.2f}x"
            # rounds interleave the sides, so round i of each saw the same host load
            paired = "-" if w is ref or len(ts) != len(ref.times["off"]) else \
                f"{statistics.median(a / b for a, b in zip(ref.times['off'], ts)):.2f}x"
            print(f"{name:<62} {params:>22} {tokens:>8} {comp:>9} {fmt_t(ts):>24} "
                  f"{statistics.median(w.cpu[flag]):>10.2f} {tps:>6.0f} {ratio:>11} {paired:>6} {rss:>11.0f}")
    ours_info = phases[0][1][1][1].info
    print(f"exact parameter counts: student {ours_info['params_student']:,}, teacher {ours_info['params_teacher']:,} "
          f"(ModelConfig.num_params(), without the q/k/v biases: {ours_info['num_params_student']:,} / "
          f"{ours_info['num_params_teacher']:,}); torch attention: {phases[0][2].info['attn_impl']}, "
          f"{phases[0][2].info['torch_threads']} threads; JAX devices {ours_info['devices']}; "
          f"load avg at end {os.getloadavg()[0]:.2f}")
    for title, _, _, prof in phases:
        if not prof:
            continue
        print(f"\nbreakdown ({title.split(':')[0]}, chunk {chunks[0]}; each piece its own call, min of 2 after a "
              f"warm-up; pieces overlap, they do not sum to the step):")
        for side in ("theirs", "ours"):
            for k, v in prof[side].items():
                print(f"  {side:<7} {k:<58} {v:7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
