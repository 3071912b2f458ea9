"""What the demo-task experiments share (compare.py, figure1b.py): one seed's common start, training
a method from it, and the metrics of a trained student.

A *start* is everything the methods of one seed share, so that they differ only in the objective:
the seed's data draws, the warmed-up student (`demo.run.warm_up_student`), the teacher's responses
to the held-out prompts, the teacher's responses to the distillation prompts (sampled by the
first method that trains and reused by every later one) and the epoch-1 student responses (the
warmed-up student's samples, the same for every method that trains on student responses: sampled
by the first such method and placed in each later one's run folder, where the trainer's restartable
generation finds them complete and checks that they were made with the same arguments).

Metrics of a student on the held-out prompts (`measure`):

* exact match (greedy), NLL of the teacher's sampled responses and the acceptance rate as the
  teacher's speculative-decoding draft: `demo.run.evaluate_model`;
* NLL of its *own* responses (`own_nll`): the student samples one response per held-out prompt
  with the paper's sampling (temperature 0.8, top-p 0.95, `generation.generate_file`), the
  responses become a pair file (chosen = its own response, `data.pairs.build_pairs`), and
  `evaluate.nll` scores them under the same student (temperature 1). Low means the student is
  confident in what it says itself; every student of a seed samples with the same seed.

The scripts are run from the repository root (`python experiments/compare.py`), so this module
is imported as a sibling; both scripts put this folder on sys.path for importlib loaders (tests).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from distillm2_jax import api, evaluate, objectives
from distillm2_jax.data.pairs import build_pairs
from distillm2_jax.demo import assets, run, task
from distillm2_jax.errors import UserError
from distillm2_jax.generation import generate_file, meta_path
from distillm2_jax.hf import from_pretrained
from distillm2_jax.train.loop import TrainingDiverged

# Own-response sampling seed = settings.seed + 1000: apart from the streams demo.run draws from
# (seed, seed + 1 for the held-out teacher responses) for every seed of a run.
OWN_SEED_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class Method:
    """A trainable row of an experiment: the objective and the config keys that differ from the demo's."""
    key: str                 # command-line name and run folder
    label: str               # name in tables
    objective: str           # objective.name
    overrides: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.overrides.items())
        return f"{self.key}: {self.label} (objective {self.objective}{'; ' + extra if extra else ''})"


def pick_methods(names: Sequence[str] | None, registry: Sequence[Method]) -> list[Method]:
    """The methods `names` asks for, in the registry's order; a key or a label, any case.

    Raises UserError for an unknown name, listing every choice.
    """
    if not names:
        return list(registry)
    index = {}
    for m in registry:
        index[m.key.lower()] = index[m.label.lower()] = m
    unknown = [n for n in names if n.lower() not in index]
    if unknown:
        choices = "\n  ".join(m.describe() for m in registry)
        raise UserError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"choose from:\n  {choices}")
    wanted = {index[n.lower()].key for n in names}
    return [m for m in registry if m.key in wanted]


def add_run_args(ap) -> None:
    """The options compare.py and figure1b.py share: --methods, --quick, --set."""
    ap.add_argument("--methods", nargs="+", metavar="METHOD", help="keys or labels (default: all, see below)")
    ap.add_argument("--quick", action="store_true", help="the demo's reduced sizes (a smoke test)")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="assignments",
                    help="change a demo size, e.g. --set distill_prompts=256 epochs=3 (run.DemoSettings fields)")


def resolve_run_args(ap, args, registry: Sequence[Method]) -> None:
    """Turn --methods and --quick/--set into `args.methods` and `args.settings` (argparse errors)."""
    try:
        args.methods = pick_methods(args.methods, registry)
    except UserError as e:
        ap.error(f"--methods: {e}")
    try:
        args.settings = demo_settings(args.quick, args.assignments)
    except UserError as e:
        ap.error(f"--set: {e}")


def demo_settings(quick: bool = False, assignments: Sequence[str] = ()) -> run.DemoSettings:
    """`DemoSettings()` (or `.quick()`) with `field=value` assignments, e.g. "distill_prompts=256".

    Raises UserError for an unknown field or a value of the wrong type, naming the fields.
    """
    base = run.DemoSettings.quick() if quick else run.DemoSettings()
    fields = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(base)
              if f.name not in ("seed", "objectives")}  # the seed comes from --seed(s)
    changes = {}
    for a in assignments:
        name, sep, text = a.partition("=")
        if not sep or name not in fields:
            raise UserError(f"{a!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            changes[name] = fields[name](text)
        except ValueError:
            raise UserError(f"{a!r}: {name} takes a {fields[name].__name__}") from None
    return dataclasses.replace(base, **changes)


def use_compile_cache(out: Path) -> None:
    """Every run of an experiment compiles the same shapes: the persistent cache turns later compiles into loads."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def heldout_set(out: Path, settings: run.DemoSettings) -> tuple[list, Path]:
    """The held-out prompts every seed and student is evaluated on (drawn with seed 0), and their file."""
    heldout = task.make_examples(settings.heldout, seed=0, split="heldout")
    return heldout, task.write_jsonl(out / "heldout.jsonl", heldout)


class Clock:
    """Wall and process CPU seconds since the last lap. The CPU time (all threads) tells the cost
    apart from waiting on a shared machine: on an idle 2-core CPU the wall time lies between
    CPU / 2 and CPU."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {f"{name}_s": round(wall - self.wall, 1), f"{name}_cpu_s": round(cpu - self.cpu, 1)}
        self.wall, self.cpu = wall, cpu
        return out


@dataclasses.dataclass
class Start:
    """One seed's common start (module docstring)."""
    root: Path
    settings: run.DemoSettings
    tokenizer: object
    teacher: object
    heldout: list
    heldout_file: Path
    pairs: Path                               # held-out teacher responses (chosen) with answers
    teacher_responses: Path | None = None     # the distillation prompts' teacher responses, once sampled
    student_epoch1: Path | None = None        # the warmed-up student's responses to them, once sampled
    timings: dict = dataclasses.field(default_factory=dict)

    @property
    def student_dir(self) -> Path:
        return self.root / "student_sft"

    def student(self):
        """The warmed-up student every method starts from."""
        return from_pretrained(self.student_dir)


def prepare_start(root: Path, settings: run.DemoSettings, heldout: list, heldout_file: Path) -> Start:
    """Data, the student's warm-up and the held-out teacher responses of one seed, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    tokenizer = assets.build_tokenizer(root / "tokenizer")
    files = run.write_data(root, settings)
    run.warm_up_student(root, files["sft"], tokenizer, settings, progress=False)
    timings = clock.lap("warm_up")
    teacher = from_pretrained(assets.TEACHER_DIR)
    pairs = run.heldout_pairs(root, teacher, tokenizer, heldout_file, settings)
    timings.update(clock.lap("heldout_teacher"))
    return Start(root, settings, tokenizer, teacher, heldout, heldout_file, pairs, timings=timings)


def train(start: Start, method: Method, log: Callable[[str], None] | None = None) -> Path:
    """Train `method` from the start's warmed-up student with the demo's budget; returns the run folder.

    The first call samples the teacher's responses to the distillation prompts, and the first
    method that trains on student responses samples the epoch-1 ones; later calls reuse them.
    Raises `TrainingDiverged` (a non-finite loss) like `api.train`.
    """
    cfg = run.train_config(start.root, start.settings, method.objective, teacher_responses=start.teacher_responses,
                           run_name=method.key, overrides={"logging.progress": False, **method.overrides})
    data = Path(cfg.run_dir) / "data"
    on_policy = objectives.get(method.objective).student_responses
    if on_policy and start.student_epoch1 is not None:
        data.mkdir(parents=True, exist_ok=True)
        for src in (start.student_epoch1, meta_path(start.student_epoch1)):
            shutil.copyfile(src, data / src.name)
    result = api.train(cfg, log=log or (lambda m: None))
    if start.teacher_responses is None:
        start.teacher_responses = data / "teacher.jsonl"
    if on_policy and start.student_epoch1 is None:
        start.student_epoch1 = data / "student_epoch1.jsonl"
    return Path(result.run_dir)


def _nll_kwargs() -> dict:
    return dict(max_length=run.MAX_LENGTH, max_prompt_length=run.MAX_PROMPT_LENGTH, chunk_size=run.MAX_LENGTH,
                batch_size=64)


def nll(model, start: Start, pairs: Path) -> float:
    """Mean NLL per response token of the `chosen` responses of `pairs` under `model`."""
    return evaluate.nll(model, str(pairs), start.tokenizer, **_nll_kwargs()).nll


def own_responses(model, start: Start, name: str) -> Path:
    """`model`'s sampled responses to the held-out prompts as a pair file (chosen = its response)."""
    s = start.settings
    gen = start.root / "own" / f"{name}.jsonl"
    generate_file(model, str(start.heldout_file), gen, tokenizer=start.tokenizer, temperature=s.temperature,
                  top_p=s.top_p, max_new_tokens=s.max_new_tokens, max_prompt_length=run.MAX_PROMPT_LENGTH,
                  seed=s.seed + OWN_SEED_OFFSET, batch_size=256, progress=False, model_name=name, overwrite=True)
    pairs = gen.with_name(f"{name}_pairs.jsonl")
    build_pairs(str(gen), str(gen), str(pairs))
    return pairs


def own_nll(model, start: Start, name: str) -> dict:
    """NLL of `model`'s own sampled responses to the held-out prompts (module docstring)."""
    pairs = own_responses(model, start, name)
    r = evaluate.nll(model, str(pairs), start.tokenizer, **_nll_kwargs())
    return {"own_nll": r.nll, "own_tokens": r.tokens, "own_pairs": str(pairs)}


def measure(model, start: Start, name: str) -> dict:
    """Every held-out metric of `model`: `demo.run.evaluate_model`'s row plus `own_nll`."""
    clock = Clock()
    row = run.evaluate_model(model, start.teacher, start.tokenizer, start.heldout, start.pairs)
    row.update(own_nll(model, start, name))
    return {**row, **clock.lap("eval")}


def train_and_measure(start: Start, method: Method, metrics: Callable[[object, Start, str], dict] = measure) -> dict:
    """Train `method` from the start and return `metrics(student, start, method.key)` plus timings.

    A diverged run (non-finite loss) is a result, not a crash: its row is {"diverged": message}
    and every metric NaN, so the other methods of the experiment still run.
    """
    clock = Clock()
    try:
        run_dir = train(start, method)
    except TrainingDiverged as e:
        return {"diverged": str(e), **clock.lap("train")}
    timings = clock.lap("train")
    row = metrics(api.restore_student(run_dir), start, method.key)
    return {**row, "run_dir": str(run_dir), **timings}


def value(row: dict, key: str) -> float:
    """A metric of a row as a float; NaN when the row has none (a diverged run, the teacher's acceptance)."""
    v = row.get(key)
    return float("nan") if v is None else float(v)


def to_json(data) -> str:
    """`data` as indented JSON text; NaN (a missing metric, a diverged run, an interval of one seed) as null."""
    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=2, default=str) + "\n"


def write_block(path: Path, name: str, block: str) -> None:
    """Replace the text between `<!-- {name}: start -->` and `<!-- {name}: end -->` of `path` with `block`.

    The markers are appended (with the block) when `path` lacks them; other text is left alone.
    """
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    body = f"{start}\n{block.strip()}\n{end}"
    old = path.read_text() if path.exists() else "# Experiments\n"
    if start in old and end in old and old.index(start) < old.index(end):
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + body + "\n"
    path.write_text(new)
    print(f"table written to {path}", flush=True)
