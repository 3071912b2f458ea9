"""The trainer's whole step (pair file -> loader batch -> shared-prompt forward -> chunked loss over
micro-batches -> update) against the paper's formulas computed independently: PyTorch logits of
each [prompt | response] row run alone (no padding), then numpy in float64.

The step is the Trainer's own compiled program (`Trainer.compile_step`, its `step_config`,
`objective_beta` and the curriculum's teacher pass); only the optimizer is plain SGD with lr 1,
so that the update is minus the gradient and can be checked by finite differences of the
reference. The teacher's head is wider than the tokenizer (the paper's Qwen2.5 case), so both
sides slice logits to the shared vocabulary.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distillm2_jax.hf.load import from_pretrained
from distillm2_jax.train import epoch_data
from distillm2_jax.train.loop import Trainer
from distillm2_jax.train.batch import Batch
from distillm2_jax.train.step import StepInputs, TrainState
from tests.tiny_models import build_hf_model
from tests.tiny_run import tiny_config
from tests.tiny_tokenizer import EOS_ID, VOCAB_SIZE, build_tiny_tokenizer

A0, A_MIN, B0 = 0.1, 0.01, 0.5
EPOCHS, STEPS_PER_EPOCH = 3, 4          # the run the b schedule is evaluated in
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
# Prompts of different lengths; chosen = the teacher's greedy response of CHOSEN_TOKENS[i] tokens,
# rejected = the student's of REJECTED_TOKENS[i] (so both halves have positive, varied gaps).
PROMPTS = ["sort", "what is two plus three", "please write short poem about sea sun moon stars river", "hello"]
CHOSEN_TOKENS, REJECTED_TOKENS = [6, 2, 11, 4], [3, 9, 1, 6]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tokenizer, teacher (head of 416 rows > 400 tokens) and student as HF folders, a pair file of
    their own responses, the distillm2 and kd Trainers on them, and the same models loaded back by
    transformers. PyTorch runs on one thread: tiny matmuls on two busy cores are ~50x slower."""
    import torch
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    root = tmp_path_factory.mktemp("step_reference")
    tok = build_tiny_tokenizer(root / "tokenizer")
    common = dict(bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=0, initializer_range=0.2)
    teacher = build_hf_model("qwen2", root / "teacher", seed=0, vocab_size=VOCAB_SIZE + 16, hidden_size=64,
                             intermediate_size=128, **common)
    student = build_hf_model("qwen2", root / "student", seed=1, vocab_size=VOCAB_SIZE, hidden_size=32,
                             intermediate_size=64, tie_word_embeddings=True, **common)
    for d in ("teacher", "student"):
        tok.save_pretrained(str(root / d))
    pairs = [(p, _greedy(teacher, tok, p, c), _greedy(student, tok, p, r))
             for p, c, r in zip(PROMPTS, CHOSEN_TOKENS, REJECTED_TOKENS)]
    with open(root / "pairs.jsonl", "w") as f:
        for p, c, r in pairs:
            user = {"role": "user", "content": p}
            f.write(json.dumps({"prompt": p, "chosen": [user, {"role": "assistant", "content": c}],
                                "rejected": [user, {"role": "assistant", "content": r}]}) + "\n")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    paths = {"teacher": root / "teacher", "student": root / "student", "pairs": root / "pairs.jsonl",
             "prompts": root / "prompts.jsonl"}
    common_cfg = {"train.global_batch": len(PROMPTS), "train.micro_batch": 2, "train.epochs": EPOCHS,
                  "data.max_length": 96, "data.max_prompt_length": 64, "objective.chunk_size": 8,
                  "objective.beta_schedule": "paper", "objective.curriculum": "true"}
    quiet = dict(log=lambda *a, **k: None)
    trainers = {name: Trainer(tiny_config(paths, root / name, **common_cfg, **{"objective.name": name}), **quiet)
                for name in ("distillm2", "kd")}
    torch_models = {d: AutoModelForCausalLM.from_pretrained(str(root / d), dtype=torch.float32).eval()
                    for d in ("teacher", "student")}
    yield {"root": root, "trainers": trainers, "torch": torch_models, "tokenizer": tok, "pairs": pairs,
           "compiled": {}}
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the reference
def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _prompt_ids(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(model, tokenizer, prompt, n):
    """A model's greedy response of n tokens, among tokens that decode to ASCII letters (a plain
    text that the pair file can carry)."""
    import torch

    allowed = torch.tensor([i for i in range(len(tokenizer))
                            if (s := tokenizer.decode([i])).replace(" ", "").isalpha() and s.isascii()])
    ids, out = _prompt_ids(tokenizer, prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(allowed[logits[allowed].argmax()]))
    return tokenizer.decode(out).strip()


def _reference_tokens(tokenizer, pairs):
    """Each pair tokenised here, as the paper says: chat-template prompt with generation prompt,
    response text + the end-of-turn token (<|im_end|>, which the response must learn to emit)."""
    out = []
    for p, c, r in pairs:
        prompt = _prompt_ids(tokenizer, p)
        resp = [tokenizer(x, add_special_tokens=False)["input_ids"] + [EOS_ID] for x in (c, r)]
        out.append((prompt, resp[0], resp[1]))
    return out


def _response_logprobs(model, prompt, response, vocab):
    """[len(response), vocab] float64 log-probs at the positions that predict the response tokens:
    the row alone, no padding, logits sliced to the tokenizer's vocabulary."""
    import torch

    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1, :vocab]
    return _log_softmax(logits.double().numpy())


def _label_mean(lx, labels):
    return float(lx[np.arange(len(labels)), labels].mean())


def reference_gaps(lp, lq, tokens):
    """Per pair: gap_t = exp(mean log p(y_t)) - exp(mean log q(y_t)), gap_s = exp(mean log q(y_s)) -
    exp(mean log p(y_s)). lp/lq[j] = (TGO log-probs, SGO log-probs) of pair j."""
    gt = [np.exp(_label_mean(lp[j][0], tokens[j][1])) - np.exp(_label_mean(lq[j][0], tokens[j][1]))
          for j in range(len(tokens))]
    gs = [np.exp(_label_mean(lq[j][1], tokens[j][2])) - np.exp(_label_mean(lp[j][1], tokens[j][2]))
          for j in range(len(tokens))]
    return np.asarray(gt), np.asarray(gs)


def reference_alpha(gap, m):
    return np.clip(1.0 - (1.0 - A0) * m / (gap + 1e-5), A_MIN, A0)


def reference_cald(lp, lq, a_t, a_s, b, lq_mix=None):
    """(L, SKL, SRKL): SKL_a = KL(p || a p + (1-a) q) on TGO tokens, SRKL_a = KL(q || (1-a) p + a q)
    on SGO tokens, each averaged over the response tokens of its sequence, then over pairs;
    L = (1-b) SKL + b SRKL. lq_mix: the student inside the SRKL mixture (default q itself)."""
    skl, srkl = [], []
    for j in range(len(lp)):
        p, q = np.exp(lp[j][0]), np.exp(lq[j][0])
        skl.append(np.mean(np.sum(p * (lp[j][0] - np.log(a_t[j] * p + (1 - a_t[j]) * q)), -1)))
        p, q = np.exp(lp[j][1]), np.exp(lq[j][1])
        qm = q if lq_mix is None else np.exp(lq_mix[j][1])
        srkl.append(np.mean(np.sum(q * (lq[j][1] - np.log((1 - a_s[j]) * p + a_s[j] * qm)), -1)))
    skl, srkl = float(np.mean(skl)), float(np.mean(srkl))
    return (1 - b) * skl + b * srkl, skl, srkl


def reference_kd(lp, lq):
    """KD: forward KL(p || q) on TGO tokens, per-sequence mean, mean over pairs."""
    return float(np.mean([np.mean(np.sum(np.exp(lp[j][0]) * (lp[j][0] - lq[j][0]), -1)) for j in range(len(lp))]))


def reference_b(step, epoch):
    """Algorithm 1, b = clip(e/E + tau/T, b0, 1), as the project reads it (docs/losses.md): e from 0,
    tau = step within the epoch, T = steps of the whole run."""
    tau = step - epoch * STEPS_PER_EPOCH
    return float(np.clip(epoch / EPOCHS + tau / TOTAL_STEPS, B0, 1.0))


# ----------------------------------------------------------------------------- the step
def _batch(trainer, epoch, ref_tokens):
    """The trainer's batch of `epoch` (its pairs, loader and shared-prompt layout), checked token
    for token against the independent tokenisation."""
    data = epoch_data.EpochData(trainer.cfg, trainer.tokenizer, log=lambda *a, **k: None)
    pairs = data.pairs_for_epoch(epoch, teacher=trainer.teacher, student=trainer.student)
    loader = epoch_data.make_loader(trainer.cfg, pairs, trainer.tokenizer, epoch)
    local = next(loader.iterator())
    order = []   # batch pair i is PROMPTS[order[i]] (the loader shuffles)
    for i in range(len(PROMPTS)):
        prompt = local["prompt_ids"][i][local["prompt_mask"][i] == 1].tolist()
        j = next(j for j, t in enumerate(ref_tokens) if t[0] == prompt)
        order.append(j)
        for half in range(2):
            resp = ref_tokens[j][1 + half]
            ids, mask, lab = (local[k][i, half] for k in ("response_ids", "response_mask", "labels"))
            assert ids[mask == 1].tolist() == resp and lab[lab != -100].tolist() == resp
            assert (lab[:len(resp)] == resp).all()
    assert sorted(order) == list(range(len(PROMPTS)))
    return Batch(*(jnp.asarray(local[k], jnp.int32) for k in Batch._fields))


def _run_step(run, objective, batch, *, step, epoch, ref_gap=0.0, curriculum_on=False):
    """One step as `Trainer.run` takes it (same inputs), with SGD lr 1: returns (metrics, grads, beta).
    One compiled step per trainer, so epoch 1 and the curriculum share a program (the
    curriculum is a traced flag), as in a run."""
    trainer = run["trainers"][objective]
    tx = optax.sgd(1.0)
    state = jax.jit(lambda t: TrainState(step=jnp.asarray(step, jnp.int32), trainable=t, opt_state=tx.init(t)))(
        trainer.trainable0)
    num_micro = trainer.cfg.train.grad_accum
    if objective not in run["compiled"]:
        run["compiled"][objective] = trainer.compile_step(tx, jax.tree.map(lambda x: x.sharding, state), num_micro)
    step_fn = run["compiled"][objective]
    beta = trainer.objective_beta(step, TOTAL_STEPS, epoch, STEPS_PER_EPOCH)
    teacher_logps = None
    if trainer.step_config().curriculum:
        rows = 2 * (trainer.cfg.train.global_batch // num_micro)
        teacher_logps = jnp.zeros((num_micro, rows), jnp.float32)
        if curriculum_on:
            teacher_logps = trainer.compile_measure(num_micro)[0](trainer.teacher_params, batch)
    inputs = StepInputs(jnp.float32(beta), jnp.float32(ref_gap),
                        jax.random.key_data(jax.random.fold_in(jax.random.key(trainer.cfg.seed), step)),
                        jnp.bool_(curriculum_on), teacher_logps)
    new, metrics = step_fn(state, trainer.frozen, trainer.teacher_params, batch, inputs)
    grads = jax.tree.map(lambda p, n: np.asarray(p, np.float64) - np.asarray(n, np.float64),
                         trainer.trainable0, new.trainable)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, grads, beta


@pytest.fixture(scope="module")
def reference(run):
    """Float64 log-probs of both models on every row ([pair][TGO, SGO] -> [len, V])."""
    tokens = _reference_tokens(run["tokenizer"], run["pairs"])
    vocab = len(run["tokenizer"])
    lp = [[_response_logprobs(run["torch"]["teacher"], t[0], r, vocab) for r in t[1:]] for t in tokens]
    lq = [[_response_logprobs(run["torch"]["student"], t[0], r, vocab) for r in t[1:]] for t in tokens]
    return {"tokens": tokens, "lp": lp, "lq": lq}


def _close(got, want, what, rtol=1e-4, atol=1e-7):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    return abs(got - want), abs(got - want) / max(abs(want), 1e-30)


def test_epoch1_step_is_cald_with_fixed_alpha(run, reference):
    """Epoch 1: a = a0 on every row, b from the schedule (= b0 this early), the loss is paper Eq. 2."""
    batch = _batch(run["trainers"]["distillm2"], 0, reference["tokens"])
    metrics, _, beta = _run_step(run, "distillm2", batch, step=2, epoch=0)
    b = reference_b(2, 0)
    assert beta == pytest.approx(b, abs=1e-7) and b == B0
    a = np.full(len(PROMPTS), A0)
    loss, skl, srkl = reference_cald(reference["lp"], reference["lq"], a, a, b)
    for k, want in (("loss", loss), ("skl", skl), ("srkl", srkl)):
        _close(metrics[k], want, k)
    for k in ("alpha_min", "alpha_max", "alpha_mean"):
        assert metrics[k] == pytest.approx(A0, rel=1e-6), k
    assert metrics["tokens"] == sum(len(t[1]) + len(t[2]) for t in reference["tokens"])


def test_curriculum_step_loss_and_gradient(run, reference):
    """Epoch 3 with the curriculum on: per-row a from the gaps (m chosen so that a takes a0, a_min
    and a value in between, and varies within both halves), b > b0 from the schedule; loss, parts
    and a's range as the paper's formulas give them, and the update (SGD lr 1: minus the gradient)
    matches a central difference of the float64 reference along a random direction of the
    student's weights."""
    import torch

    lp, lq, tokens = reference["lp"], reference["lq"], reference["tokens"]
    gap_t, gap_s = reference_gaps(lp, lq, tokens)
    assert np.sum(gap_t > 0) >= 2 and np.sum(gap_s > 0) >= 2, (gap_t, gap_s)
    m = (gap_t[gap_t > 0].min() + 1e-5) / 0.95   # that TGO row gets a = 1 - 0.9 / 0.95, inside (a_min, a0)
    a_t, a_s = reference_alpha(gap_t, m), reference_alpha(gap_s, m)
    a = np.concatenate([a_t, a_s])
    assert a.min() == A_MIN and a.max() == A0 and np.any((a > A_MIN) & (a < A0)), a
    assert len(set(a_t)) > 1 and len(set(a_s)) > 1, a

    step, epoch = 2 * STEPS_PER_EPOCH + 1, 2
    batch = _batch(run["trainers"]["distillm2"], epoch, tokens)
    metrics, grads, beta = _run_step(run, "distillm2", batch, step=step, epoch=epoch, ref_gap=m, curriculum_on=True)
    b = reference_b(step, epoch)
    assert beta == pytest.approx(b, abs=1e-7) and b == pytest.approx(0.75)
    loss, skl, srkl = reference_cald(lp, lq, a_t, a_s, b)
    for k, want in (("loss", loss), ("skl", skl), ("srkl", srkl)):
        _close(metrics[k], want, k)
    for k, want in (("alpha_min", a.min()), ("alpha_max", a.max()), ("alpha_mean", a.mean())):
        _close(metrics[k], want, k, rtol=1e-4)

    # Directional derivative along d. a and the teacher are constants for the gradient, and so is
    # the student inside the SRKL mixture (the authors' a*sg(q), the project's default): the
    # reference keeps them at the base weights and differentiates the rest.
    student = run["torch"]["student"]
    gen = torch.Generator().manual_seed(0)
    names = [n for n, _ in student.named_parameters()]
    base = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    d = {n: torch.randn(base[n].shape, generator=gen, dtype=torch.float64) for n in names}
    d_model = type(student)(student.config)
    with torch.no_grad():
        for n, p in d_model.named_parameters():
            p.copy_(d[n].float())
    d_model.save_pretrained(str(run["root"] / "direction"))
    d_jax = from_pretrained(str(run["root"] / "direction"), dtype=jnp.float32).params()
    assert jax.tree.structure(d_jax) == jax.tree.structure(grads)
    analytic = sum(float(np.vdot(g, np.asarray(x, np.float64)))
                   for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(d_jax)))

    s64 = type(student)(student.config).double().eval()
    vocab = len(run["tokenizer"])

    def f(eps):
        with torch.no_grad():
            for n, p in s64.named_parameters():
                p.copy_(base[n] + eps * d[n])
        lq_eps = [[_response_logprobs(s64, t[0], r, vocab) for r in t[1:]] for t in tokens]
        return reference_cald(lp, lq_eps, a_t, a_s, b, lq_mix=lq)[0]

    eps = 1e-4
    numeric = (f(eps) - f(-eps)) / (2 * eps)
    assert abs(numeric) > 1e-3
    # float32 gradient noise projected on a random direction of 31k weights: ~3e-4 relative here;
    # dropping the SRKL mixture's stop-gradient would move the derivative by ~4%.
    _close(analytic, numeric, "directional derivative", rtol=2e-3)


def test_kd_step_is_forward_kl_on_teacher_responses(run, reference):
    """Baseline KD through the same step: KL(p || q) on TGO only, per-sequence mean over pairs."""
    batch = _batch(run["trainers"]["kd"], 0, reference["tokens"])
    metrics, _, beta = _run_step(run, "kd", batch, step=0, epoch=0)
    assert beta == 0.0
    want = reference_kd(reference["lp"], reference["lq"])
    _close(metrics["loss"], want, "loss")
    _close(metrics["fkl"], want, "fkl")
