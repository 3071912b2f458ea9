"""A real-size load, train step and export, measured: time and host memory at Qwen2.5-1.5B shape.

What it does, in one process:

1. writes two randomly initialised bf16 checkpoints with the exact shape of the chosen model
   (default Qwen2.5-1.5B: 1.54B parameters, 2.9 GiB), as HF-named, sharded safetensors with a
   `model.safetensors.index.json`, one tensor at a time (never the whole model in memory), plus
   a local byte-level BPE tokenizer with the model's full vocabulary (no hub download);
2. loads the student onto N fake CPU devices (default 8) with an FSDP mesh (1, N, 1) through
   `distillm2_jax.hf.from_pretrained`, and measures the load time and the load's peak host
   memory increase. With fake CPU devices the device buffers ARE host memory, so the increase
   should be about 1x the checkpoint; 2x would mean a full extra copy somewhere;
3. runs one LoRA DistiLLM-2 step (`api.train`'s Trainer, `max_steps=1`) with the second
   checkpoint as the teacher, on a few synthetic pairs (prompt 32 + response 32 tokens);
4. exports the student with the project's export (`api.export`), reloads the exported folder
   and checks its logits against the trained student's.

Memory is read from /proc/self/status: VmHWM (the kernel's peak resident set, reset before each
phase through /proc/self/clear_refs) and, sampled every 10 ms, RssAnon (private memory: numpy
arrays, device buffers) and RssFile (pages of mapped files: safetensors files are read through
mmap, so their page-cache pages count as resident while open; the kernel can drop them at any
time). A phase's "increase" is its peak minus the resident set just before it.

    python benchmarks/real_size.py                      # Qwen2.5-1.5B shape, 8 fake devices
    python benchmarks/real_size.py --layers 2           # same widths, 2 layers (quick)
    python benchmarks/real_size.py --out /tmp/rs --keep --json /tmp/rs/figures.json
    python benchmarks/real_size.py --layers 2 --hidden 64 --intermediate 128 --heads 4 \\
        --kv-heads 2 --vocab 512                        # tiny (the smoke test's shape)

`main(argv)` returns the figures as a dict (the smoke test calls it in-process).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024**3

# HF config.json of each model (as published on the hub, token ids aside: see `hf_config`).
MODELS: dict[str, dict] = {
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960, "initializer_range": 0.02,
        "max_position_embeddings": 131072, "max_window_layers": 28, "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864, "initializer_range": 0.02,
        "max_position_embeddings": 32768, "max_window_layers": 24, "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
    },
}

# Special tokens at ids 0..3 (as the project's toy tokenizer); <|endoftext|> plays Qwen's
# bos/eos/pad role in config.json, <|im_end|> ends a chat turn.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
ENDOFTEXT_ID = 0

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "explain why the sky is blue and write a short poem about the sea sun moon stars river "
         "mountain what is two plus three equals five number math code python function return").split()


# ------------------------------------------------------------------------------------------------
# Memory: /proc/self/status
# ------------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Time and peak memory of a block: `with Phase("load", phases): ...`."""

    def __init__(self, name: str, record: dict, interval: float = 0.01):
        self.name, self.record, self.interval = name, record, interval

    def __enter__(self):
        gc.collect()
        self.before = _status()
        self.hwm_reset = _reset_hwm()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._update()
            self._stop.wait(self.interval)

    def _update(self):
        now = _status()
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._update()
        after = _status()
        b = self.before
        # VmHWM covers what the 10 ms sampler may miss; without the reset it is the process peak.
        peak_rss = max(self.peak["VmRSS"], after["VmHWM"] if self.hwm_reset else 0)
        self.record[self.name] = {
            "seconds": self.seconds,
            "rss_before_gib": b["VmRSS"] / GiB,
            "peak_rss_gib": peak_rss / GiB,
            "peak_increase_gib": (peak_rss - b["VmRSS"]) / GiB,
            "peak_anon_increase_gib": (self.peak["RssAnon"] - b["RssAnon"]) / GiB,
            "peak_file_increase_gib": (self.peak["RssFile"] - b["RssFile"]) / GiB,
            "retained_gib": (after["VmRSS"] - b["VmRSS"]) / GiB,
            "retained_anon_gib": (after["RssAnon"] - b["RssAnon"]) / GiB,
        }
        return False


# ------------------------------------------------------------------------------------------------
# Checkpoint and tokenizer writers
# ------------------------------------------------------------------------------------------------
def hf_config(args) -> dict:
    cfg = dict(MODELS[args.model])
    for key, attr in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"),
                      ("intermediate_size", "intermediate"), ("num_attention_heads", "heads"),
                      ("num_key_value_heads", "kv_heads"), ("vocab_size", "vocab")):
        value = getattr(args, attr)
        if value is not None:
            cfg[key] = value
    cfg["max_window_layers"] = cfg["num_hidden_layers"]
    # Qwen2.5 uses <|endoftext|> as bos and eos of the base model: id 0 in our tokenizer.
    cfg.update(bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID)
    return cfg


def hf_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a Qwen2 checkpoint, in HF's order.
    init: "normal" (weights), "ones" (norms) or "bias"."""
    h, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "normal")]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.q_proj.bias", (h,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
        ]
    out.append(("model.norm.weight", (h,), "ones"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h), "normal"))
    return out


def _write_tensor_data(f, shape, init: str, rng) -> None:
    """Write one random bf16 tensor's bytes in blocks of at most 32 MiB (bounded memory).

    The bf16 bit patterns are drawn directly (fast: no float32 normal draws): weights and biases
    are +-[1/64, 1/32) with a random sign and mantissa (std ~0.024, near Qwen's initializer_range
    of 0.02); norm weights are in [1, 1.125).
    """
    import numpy as np

    total = int(np.prod(shape, dtype=np.int64))
    block = 1 << 24
    for start in range(0, total, block):
        bits = rng.integers(0, 1 << 16, size=min(block, total - start), dtype=np.uint16)
        if init == "ones":
            bits &= 0x000F
            bits |= 127 << 7            # exponent 0: 1.0 + mantissa
        else:
            bits &= 0x807F              # random sign and mantissa
            bits |= (127 - 6) << 7      # exponent -6: [1/64, 1/32)
        f.write(bits.tobytes())


def write_checkpoint(out_dir: Path, cfg: dict, *, seed: int, shard_bytes: int) -> int:
    """A random bf16 checkpoint of `cfg` under out_dir (config.json, sharded safetensors with an
    index); tensors are generated and written one at a time. Returns the bytes of tensor data."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = 2 * int(np.prod(t[1]))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, _ in shard:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        with open(out_dir / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, init in shard:
                _write_tensor_data(f, shape, init, rng)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def build_tokenizer(out_dir: Path, vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids with a ChatML template: 4 special
    tokens, the 256 byte symbols, then synthetic merges (letters and the space marker first), so
    that `len(tokenizer)` equals the model's vocabulary and the logits are full width."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from distillm2_jax.toy import CHATML_TEMPLATE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise SystemExit(f"--vocab {vocab_size}: the tokenizer needs at least {len(SPECIAL_TOKENS) + len(alphabet)}")
    first = [c for c in "etaoinshrdlucmfwypvbgkjqxz"] + ["\u0120"]  # \u0120: byte-level space
    base = first + sorted(set(alphabet) - set(first))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in base:
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    level = base
    while len(vocab) < vocab_size:
        nxt = []
        for left in level:
            for right in base:
                tok = left + right
                if tok in vocab:
                    continue
                vocab[tok] = len(vocab)
                merges.append((left, right))
                nxt.append(tok)
                if len(vocab) == vocab_size:
                    break
            if len(vocab) == vocab_size:
                break
        level = nxt
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 model_max_length=4096, chat_template=CHATML_TEMPLATE)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    assert len(hf) == vocab_size, (len(hf), vocab_size)
    return hf


def write_pairs(path: Path, n: int, *, seed: int = 0) -> None:
    """n synthetic pairs, each side long enough to fill the prompt and response budgets."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            prompt = f"{i}: {text(40)}"
            chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(40)}]
            rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(40)}]
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


# ------------------------------------------------------------------------------------------------
# Device-side figures
# ------------------------------------------------------------------------------------------------
def device_bytes(tree) -> tuple[int, int, int]:
    """(bytes of the arrays' logical values, bytes of all device buffers, bytes on the fullest device)."""
    import jax

    logical = total = 0
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        logical += leaf.nbytes
        for s in leaf.addressable_shards:
            n = s.data.nbytes
            total += n
            per_device[s.device] = per_device.get(s.device, 0) + n
    return logical, total, max(per_device.values())


def _block(tree):
    import jax
    jax.block_until_ready(jax.tree.leaves(tree))


def _probe_batch(vocab: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(SPECIAL_TOKENS), vocab, size=(2, 16)).astype(np.int32)
    return ids, np.ones_like(ids)


def _logits(model, ids, mask):
    import numpy as np
    return np.asarray(model(ids, mask), np.float32)


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, help="override num_hidden_layers (e.g. 2 for a quick run)")
    p.add_argument("--hidden", type=int, help="override hidden_size")
    p.add_argument("--intermediate", type=int, help="override intermediate_size")
    p.add_argument("--heads", type=int, help="override num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    p.add_argument("--vocab", type=int, help="override vocab_size (the tokenizer gets the same size)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices, all on the fsdp axis (default 8)")
    p.add_argument("--pairs", type=int, help="pairs in the train step (default: the device count)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_saveable"])
    p.add_argument("--chunk-size", type=int, default=16,
                   help="objective.chunk_size: positions per chunk of the loss's [rows, chunk, vocab] logits")
    p.add_argument("--shard-gb", type=float, default=1.0, help="max safetensors shard size, GB (default 1)")
    p.add_argument("--out", help="work folder (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints, run and export")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--load-only", action="store_true",
                   help="stop after the load (no train step, no export): at full size on 8 fake CPU devices "
                        "the step needs more host memory than a 23 GiB machine has (docs/benchmarks/real_size.md)")
    return p.parse_args(argv)


def _setup_jax(devices: int):
    """Ask for `devices` fake CPU devices unless jax is already initialised (e.g. under pytest)."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # XLA:CPU sizes the fake devices' collective thread pool by NPROC; on a 2-core host 8
        # devices need more threads than cores (see tests/conftest.py).
        os.environ.setdefault("NPROC", "32")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import jax
    return jax


def main(argv=None, *, log=print) -> dict:
    args = parse_args(argv)
    jax = _setup_jax(args.devices)
    import jax.numpy as jnp
    import numpy as np

    from distillm2_jax import api
    from distillm2_jax import sharding as shd

    n_dev = min(args.devices, len(jax.devices()))
    if n_dev < args.devices:
        log(f"note: jax already has {len(jax.devices())} device(s); using {n_dev}")
    pairs = args.pairs or n_dev
    cfg = hf_config(args)
    created = args.out is None
    work = Path(tempfile.mkdtemp(prefix="real_size_") if created else args.out)
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: work / k for k in ("student", "teacher", "tokenizer", "run", "export")}
    phases: dict = {}
    fig: dict = {"model": args.model, "devices": n_dev, "layers": cfg["num_hidden_layers"],
                 "hidden": cfg["hidden_size"], "vocab": cfg["vocab_size"], "pairs": pairs,
                 "prompt_len": args.prompt_len, "response_len": args.response_len,
                 "compute_dtype": args.compute_dtype, "phases": phases}
    t_start = time.perf_counter()
    try:
        # 1. checkpoints and tokenizer ---------------------------------------------------------
        with Phase("write", phases):
            shard_bytes = int(args.shard_gb * 1e9)
            ckpt_bytes = write_checkpoint(paths["student"], cfg, seed=1, shard_bytes=shard_bytes)
            write_checkpoint(paths["teacher"], cfg, seed=2, shard_bytes=shard_bytes)
            tok = build_tokenizer(paths["tokenizer"], cfg["vocab_size"])
            for d in ("student", "teacher"):
                tok.save_pretrained(str(paths[d]))
        fig["params"] = ckpt_bytes // 2
        fig["checkpoint_gib"] = ckpt_bytes / GiB
        fig["checkpoint_files"] = len(list(paths["student"].glob("*.safetensors")))
        log(f"wrote 2 checkpoints of {fig['params'] / 1e9:.3f}B params, {fig['checkpoint_gib']:.3f} GiB each "
            f"({fig['checkpoint_files']} shards) in {phases['write']['seconds']:.1f} s")

        # 2. load onto an FSDP mesh ---------------------------------------------------------------
        mesh = shd.make_mesh((1, n_dev, 1))
        jax.block_until_ready(jnp.zeros(()))  # backend up before the baseline
        with Phase("load", phases):
            model = api.from_pretrained(paths["student"], dtype=jnp.bfloat16, mesh=mesh)
            _block(model.params())
        logical, total, fullest = device_bytes(model.params())
        load = phases["load"]
        fig.update(load_s=load["seconds"], load_peak_increase_gib=load["peak_increase_gib"],
                   load_ratio=load["peak_increase_gib"] / fig["checkpoint_gib"],
                   load_anon_ratio=load["peak_anon_increase_gib"] / fig["checkpoint_gib"],
                   load_retained_ratio=load["retained_anon_gib"] / fig["checkpoint_gib"],
                   device_total_ratio=total / ckpt_bytes, fullest_device_ratio=fullest / ckpt_bytes)
        log(f"load: {load['seconds']:.1f} s; peak RSS +{load['peak_increase_gib']:.3f} GiB "
            f"({fig['load_ratio']:.2f}x the checkpoint; anonymous +{load['peak_anon_increase_gib']:.3f} GiB = "
            f"{fig['load_anon_ratio']:.2f}x, mapped file pages +{load['peak_file_increase_gib']:.3f} GiB); "
            f"device buffers {total / GiB:.3f} GiB in all ({fig['device_total_ratio']:.3f}x), "
            f"fullest device {fullest / GiB:.3f} GiB ({fig['fullest_device_ratio']:.3f}x)")
        del model
        gc.collect()
        if args.load_only:
            return _finish(fig, phases, args, t_start, log)

        # 3. one LoRA DistiLLM-2 step ------------------------------------------------------------------
        write_pairs(work / "pairs.jsonl", pairs)
        run_cfg = api.with_overrides(api.Config(), [
            f"run_dir={paths['run']}", f"model.teacher={paths['teacher']}", f"model.student={paths['student']}",
            f"model.tokenizer={paths['tokenizer']}", "model.teacher_dtype=bfloat16",
            "model.student_dtype=bfloat16", f"model.compute_dtype={args.compute_dtype}",
            f"model.remat={args.remat}", f"data.pairs={work / 'pairs.jsonl'}",
            f"data.max_length={args.prompt_len + args.response_len}",
            f"data.max_prompt_length={args.prompt_len}", "generation.regenerate_student=false",
            "objective.name=distillm2", f"objective.chunk_size={args.chunk_size}", "train.epochs=1", f"train.global_batch={pairs}",
            f"train.micro_batch={pairs}", "train.max_steps_per_epoch=1", "train.log_every=1",
            "optim.lr=1e-3", "optim.warmup_ratio=0.0", "lora.enabled=true", "lora.rank=16", "lora.alpha=128",
            "checkpoint.every_steps=1000", "checkpoint.async_save=false", "logging.progress=false",
            "logging.tensorboard=false", f"mesh.shape=[1,{n_dev},1]",
        ])
        with Phase("trainer_init", phases):
            trainer = api.Trainer(run_cfg, log=lambda *a, **k: None)
            _block((trainer.frozen, trainer.teacher_params))
        with Phase("train", phases):
            result = trainer.run(max_steps=1)
        step = result.history[0]
        fig.update(trainer_init_s=phases["trainer_init"]["seconds"],
                   trainer_init_peak_increase_gib=phases["trainer_init"]["peak_increase_gib"],
                   step_s=step["step_time_s"], train_run_s=phases["train"]["seconds"],
                   train_peak_increase_gib=phases["train"]["peak_increase_gib"],
                   loss=step["loss"], step_tokens=step["tokens"])
        log(f"trainer init (student + teacher): {fig['trainer_init_s']:.1f} s, peak RSS "
            f"+{fig['trainer_init_peak_increase_gib']:.3f} GiB; step (incl. compile): {fig['step_s']:.1f} s, "
            f"loss {fig['loss']:.5f}, whole run() {fig['train_run_s']:.1f} s")
        lora_b = [v for k, v in trainer.state.trainable["layers"].items() if k.endswith("_lora_b")]
        fig["lora_b_abs_sum"] = float(sum(float(jnp.abs(v.astype(jnp.float32)).sum()) for v in lora_b))
        # The trained student's logits on a probe batch (teacher dropped first, to save memory).
        trainer.teacher = trainer.teacher_params = None
        gc.collect()
        ids, mask = _probe_batch(cfg["vocab_size"])
        trained = trainer.student_parts.merged(trainer.state.trainable,
                                               compute_dtype=run_cfg.model.compute_dtype)
        ref_logits = _logits(trained, ids, mask)
        del trained, trainer, result
        gc.collect()

        # 4. export and reload ------------------------------------------------------------------------
        with Phase("export", phases):
            api.export(paths["run"], paths["export"])
        exp_files = list(paths["export"].glob("*.safetensors"))
        fig.update(export_s=phases["export"]["seconds"],
                   export_peak_increase_gib=phases["export"]["peak_increase_gib"],
                   export_gib=sum(f.stat().st_size for f in exp_files) / GiB, export_files=len(exp_files))
        with Phase("reload", phases):
            exported = api.from_pretrained(paths["export"], dtype=jnp.bfloat16, mesh=mesh)
            got = _logits(exported, ids, mask)
            del exported
        from transformers import AutoConfig, AutoTokenizer
        hf_cfg = AutoConfig.from_pretrained(str(paths["export"]))
        hf_tok = AutoTokenizer.from_pretrained(str(paths["export"]))
        fig.update(export_dir=str(paths["export"]), export_architectures=list(hf_cfg.architectures or []),
                   export_tokenizer_len=len(hf_tok),
                   logits_max_abs_diff=float(np.max(np.abs(got - ref_logits))),
                   logits_max_abs=float(np.max(np.abs(ref_logits))))
        log(f"export: {fig['export_s']:.1f} s, peak RSS +{fig['export_peak_increase_gib']:.3f} GiB, "
            f"{fig['export_gib']:.3f} GiB in {fig['export_files']} file(s); reloaded logits max |diff| "
            f"{fig['logits_max_abs_diff']:.3g} (max |logit| {fig['logits_max_abs']:.3g})")
    finally:
        if not args.keep:
            if created:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for p in list(paths.values()) + [work / "pairs.jsonl"]:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return _finish(fig, phases, args, t_start, log)


def _finish(fig, phases, args, t_start, log) -> dict:
    fig["total_s"] = time.perf_counter() - t_start
    fig["peak_rss_gib"] = max(p["peak_rss_gib"] for p in phases.values())
    fig["kept"] = bool(args.keep)
    log(format_table(fig))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))
    return fig


def format_table(fig: dict) -> str:
    rows = [
        ("model", f"{fig['model']} ({fig['layers']} layers, hidden {fig['hidden']}, vocab {fig['vocab']}), "
                  f"{fig['params'] / 1e9:.3f}B params"),
        ("devices / mesh", f"{fig['devices']} fake CPU devices, mesh (data, fsdp, tensor) = (1, {fig['devices']}, 1)"),
        ("checkpoint (bf16)", f"{fig['checkpoint_gib']:.3f} GiB in {fig['checkpoint_files']} shard(s)"),
        ("load", f"{fig['load_s']:.1f} s"),
        ("load peak RSS increase", f"{fig['load_peak_increase_gib']:.3f} GiB = {fig['load_ratio']:.2f}x checkpoint"),
        ("  of which anonymous", f"{fig['load_anon_ratio']:.2f}x checkpoint (mapped file pages: the rest)"),
        ("  kept after load", f"{fig['load_retained_ratio']:.2f}x checkpoint"),
        ("device buffers", f"{fig['device_total_ratio']:.3f}x checkpoint in all, "
                           f"fullest device {fig['fullest_device_ratio']:.3f}x"),
    ]
    train_rows = [] if "step_s" not in fig else [
        ("trainer init (student + teacher)", f"{fig['trainer_init_s']:.1f} s, "
                                             f"+{fig['trainer_init_peak_increase_gib']:.3f} GiB peak"),
        ("train step incl. compile", f"{fig['step_s']:.1f} s ({fig['pairs']} pairs, prompt {fig['prompt_len']} + "
                                     f"response {fig['response_len']}, {fig['compute_dtype']} compute, "
                                     f"{fig['step_tokens']:.0f} tokens), loss {fig['loss']:.4f}"),
        ("train run() total", f"{fig['train_run_s']:.1f} s, +{fig['train_peak_increase_gib']:.3f} GiB peak"),
        ("export", f"{fig['export_s']:.1f} s, +{fig['export_peak_increase_gib']:.3f} GiB peak, "
                   f"{fig['export_gib']:.3f} GiB in {fig['export_files']} file(s)"),
        ("exported logits vs trained", f"max |diff| {fig['logits_max_abs_diff']:.3g} "
                                       f"(max |logit| {fig['logits_max_abs']:.3g})"),
    ]
    rows += train_rows + [
        ("overall peak RSS", f"{fig['peak_rss_gib']:.3f} GiB"),
        ("total time", f"{fig['total_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'figure'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
