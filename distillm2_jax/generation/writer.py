"""The restartable JSONL file of `generate_file`: resume, sidecar, durable appends.

The output holds one generation record per prompt, in source order. Next to it, `OUT.meta.json`
keeps the arguments the rows were made with, so a rerun can tell whether it may continue the
file (same arguments) or must refuse (different ones, unless overwriting). A write cut short
leaves a partial last line: it is not counted and is cut off before appending. Every batch is
flushed and fsynced, so a killed run loses at most the batch in flight. On several processes
only process 0 touches the files; the others read them to find the same resume point.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distillm2_jax.errors import UserError

META_FORMAT = "distillm2-generate/1"


def meta_path(out: str | os.PathLike) -> Path:
    """The sidecar of an output file: `OUT.meta.json`."""
    return Path(f"{os.fspath(out)}.meta.json")


def prompts_digest(prompts) -> str:
    """A sha256 of the prompts' ids and token ids: a rerun on other prompts cannot continue the file."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(str(p.id).encode() + b"\0")
        h.update(np.asarray(p.input_ids, np.int64).tobytes() + b"\1")
    return h.hexdigest()


def model_files_digest(model_dir: str | os.PathLike) -> str:
    """A cheap fingerprint of a model folder: names, sizes and mtimes of config + weights."""
    h = hashlib.sha256()
    d = Path(model_dir)
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.json"))):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class GenerationWriter:
    """Appends records to `out`, continuing an earlier run made with the same arguments.

    args: what the rows depend on (model, prompts, sampling); a rerun must give the same.
    info: kept in the sidecar for people, not compared (e.g. the mesh).
    is_writer: whether this process writes (process 0); the others only read.
    Use: `existing = w.resume(ids)`, then `w.start()`, `w.append(records)` per batch, `w.close()`
    (or `with w:` around the appends).
    """

    def __init__(self, out: str | os.PathLike, args: dict, info: dict | None = None, *,
                 is_writer: bool = True):
        self.out = Path(out)
        self.meta = {"format": META_FORMAT, "args": args, "info": info or {}}
        self.is_writer = is_writer
        self._file = None

    def resume(self, ids_in_order: Sequence[str], *, overwrite: bool = False) -> int:
        """How many rows of the source order the file already holds (0 for a new file).

        overwrite: delete the file and sidecar instead (the writer process only). Otherwise an
        existing file needs a sidecar with the same arguments and rows that are a prefix of
        `ids_in_order`; anything else raises UserError naming what to do.
        """
        mpath = meta_path(self.out)
        if overwrite:
            if self.is_writer:
                for p in (self.out, mpath):
                    if p.exists():
                        p.unlink()
            return 0
        if not self.out.exists():
            return 0
        if not mpath.exists():
            raise UserError(f"{self.out} exists but {mpath.name} does not, so it cannot be checked "
                            f"that it was made with these arguments: pass --overwrite to replace it")
        self._check_meta(mpath)
        return self._count_rows(list(ids_in_order))

    def start(self) -> None:
        """Write the sidecar and open the file for appending (the writer process only)."""
        if not self.is_writer:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(meta_path(self.out), self.meta)
        self._file = open(self.out, "a", encoding="utf-8")

    def append(self, records: Sequence[dict]) -> None:
        """Append one JSON line per record, flushed and fsynced (a no-op off the writer process)."""
        if self._file is None:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GenerationWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_meta(self, mpath: Path) -> None:
        """Raise UserError unless the sidecar is ours and holds the same arguments."""
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
            old = meta["args"]
            if meta.get("format") != META_FORMAT or not isinstance(old, dict):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{mpath}: not a distillm2 generate sidecar: pass --overwrite to start "
                            f"over") from None
        new = json.loads(json.dumps(self.meta["args"]))  # the same JSON types as the stored copy
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if diffs:
            raise UserError(f"{self.out} was written with different arguments ({'; '.join(diffs)}): "
                            f"rerun with the same arguments to continue it, or pass --overwrite to "
                            f"start over")

    def _count_rows(self, ids_in_order: list[str]) -> int:
        """Complete rows in the file, checked against the source order.

        A trailing partial line is not counted, and the writer process cuts it off. Any row out
        of place raises UserError.
        """
        out = self.out
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            if self.is_writer:
                with open(out, "r+b") as f:
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
            data = data[:keep]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{out}: not UTF-8 text (byte offset {err.start}); the file is damaged: "
                            f"pass --overwrite to start over") from None
        n = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rid = str(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError, RecursionError):  # ValueError: JSON syntax, huge ints
                raise UserError(f"{out}:{lineno}: not a generation record with an `id`; the file is "
                                f"damaged: pass --overwrite to start over") from None
            if n >= len(ids_in_order) or rid != ids_in_order[n]:
                want = ids_in_order[n] if n < len(ids_in_order) else "(none: all done)"
                raise UserError(f"{out}:{lineno}: row id {rid!r} where {want!r} was expected; the file "
                                f"was not written by this run's prompts: pass --overwrite to start over")
            n += 1
        return n


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name, then rename: a reader never sees half a sidecar."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
