"""The training pairs of each epoch of Algorithm 1.

Epoch 1 uses `data.pairs` when given; otherwise teacher responses (`data.teacher_responses`, or
generated once from `data.prompts` with the teacher) are paired with responses of the student.
With `generation.regenerate_student`, every later epoch samples new student responses from the
current student. Files land in RUN_DIR/data/ and generation is restartable, so a resumed run
reuses what was already generated (the sampling key of a row depends on seed, epoch and row).

Generated (and given) responses carry their sampled token ids, which training uses as they
are when they come from the training tokenizer (the teacher's); every epoch's pairs are checked
against their texts up front, and where each response's tokens come from is logged.
"""
from __future__ import annotations

from pathlib import Path

from distillm2_jax import distributed, objectives
from distillm2_jax.data.batches import check_stored_ids
from distillm2_jax.data.loader import PairLoader
from distillm2_jax.data.pairs import build_pairs, read_pairs
from distillm2_jax.errors import UserError
from distillm2_jax.generation import generate_file


def make_loader(cfg, pairs, tokenizer, epoch: int) -> PairLoader:
    """This process's loader over one epoch of pairs, in the shared-prompt layout (each prompt
    stored once; responses keep at most max_length - max_prompt_length tokens). The pairs come
    from `EpochData.pairs_for_epoch`, which checked their stored ids when reading them."""
    return PairLoader(pairs, tokenizer, global_batch_size=cfg.train.global_batch,
                      max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                      seed=cfg.seed, epoch=epoch, layout="shared_prompt", drop_remainder=True,
                      ids_checked=True)


class EpochData:
    """Prepares (generating where needed) and reads the pairs of each epoch."""

    def __init__(self, cfg, tokenizer, *, mesh=None, log=print):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.log = log
        self.dir = Path(cfg.run_dir) / "data"
        self._warned_budget = False

    def _generate(self, model, out: Path, *, seed: int, what: str) -> Path:
        g = self.cfg.generation
        if not self.cfg.data.prompts:
            raise UserError(f"data.prompts is required to generate {what} responses "
                            f"(or give data.pairs / data.teacher_responses)")
        self.log(f"generating {what} responses -> {out}")
        self._warn_if_responses_outgrow_training(what)
        generate_file(model, self.cfg.data.prompts, out, tokenizer=self.tokenizer,
                      temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                      max_new_tokens=g.max_new_tokens, max_prompt_length=self.cfg.data.max_prompt_length,
                      seed=seed, batch_size=g.batch_size, progress=self.cfg.logging.progress,
                      mesh=self.mesh, model_name=what)
        return out

    def _warn_if_responses_outgrow_training(self, what: str) -> None:
        """Training keeps at most max_length - max_prompt_length response tokens (the
        shared-prompt layout); say so once when generation may produce longer responses."""
        d, g = self.cfg.data, self.cfg.generation
        budget = d.max_length - d.max_prompt_length
        if g.max_new_tokens + 1 > budget and not self._warned_budget:
            self._warned_budget = True
            self.log(f"note: generation.max_new_tokens={g.max_new_tokens} plus the end-of-turn token exceeds "
                     f"the {budget} response tokens training keeps (data.max_length - data.max_prompt_length); "
                     f"longer {what} responses are cut there and lose their end-of-turn. Raise data.max_length "
                     f"or lower generation.max_new_tokens to avoid it")

    def teacher_responses(self, teacher) -> Path:
        """Given, or generated once per run (the file is complete after the first epoch)."""
        given = self.cfg.data.teacher_responses
        if given:
            return Path(given)
        if getattr(self, "_teacher_file", None) is None:
            self._teacher_file = self._generate(teacher, self.dir / "teacher.jsonl", seed=self.cfg.seed,
                                                what="teacher")
        return self._teacher_file

    def pairs_for_epoch(self, epoch: int, *, teacher, student) -> list:
        """The pairs of `epoch` (0-based); `student` is the current student model."""
        d, g = self.cfg.data, self.cfg.generation
        # An objective that never reads the student rows (kd, seqkd, sft) gets each teacher
        # response paired with itself: nothing is sampled from the student for it.
        needs_student = objectives.get(self.cfg.objective.name).student_responses
        regenerate = g.regenerate_student and needs_student
        if d.pairs and (epoch == 0 or not regenerate):
            return self._read(d.pairs, epoch)
        source_epoch = epoch if regenerate else 0
        pairs_path = self.dir / f"pairs_epoch{source_epoch + 1}.jsonl"
        if epoch > 0 and not regenerate:
            return self._read(pairs_path, epoch)
        self.dir.mkdir(parents=True, exist_ok=True)
        teacher_file = self.teacher_responses(teacher)
        if needs_student:
            student_file = self._generate(student, self.dir / f"student_epoch{epoch + 1}.jsonl",
                                          seed=self.cfg.seed + 7919 * (epoch + 1),
                                          what=f"epoch {epoch + 1} student")
        else:
            self.log(f"objective {self.cfg.objective.name} trains on teacher responses only: no student "
                     "responses are sampled (each pair's rejected side repeats its chosen side)")
            student_file = teacher_file
        if distributed.is_main_process():
            stats = build_pairs(teacher_file, student_file, pairs_path)
            self.log(f"epoch {epoch + 1}: {stats.summary()}")
        _barrier(f"pairs_epoch{epoch + 1}")
        return self._read(pairs_path, epoch)

    def _read(self, path, epoch: int) -> list:
        """Read a pair file and check its stored token ids now rather than mid-epoch."""
        pairs = read_pairs(str(path))
        usage = check_stored_ids(self.tokenizer, pairs)
        self.log(f"epoch {epoch + 1}: {usage.describe()}")
        return pairs


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
