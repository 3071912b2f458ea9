"""Read raw records (dicts) from JSON / JSONL / parquet / HF saved-to-disk / TFDS, with locations.

Every record comes with a `where` string ("data.jsonl:12", "data.json record 3",
"tfds:name:train record 7") so that any later validation error can name the file and the
line or record index. Nothing is ever `eval()`ed and nothing is skipped silently: a malformed
JSON line raises `UserError` unless the caller asks to skip and count (`skip_malformed`).

Source spec strings (see docs/data.md):

    FILE.jsonl | FILE.json           JSON lines, or a JSON array of objects (sniffed, not by suffix)
    FILE.parquet | DIR of *.parquet  parquet (needs pyarrow)
    DIR (datasets.save_to_disk)      arrow files + state.json/dataset_info.json (needs pyarrow);
                                     a DatasetDict folder picks its `train` split, or name
                                     the split's sub-folder (DIR/test)
    tfds:NAME[:VERSION][:SPLIT][@DATA_DIR]
                                     an array_record TFDS dataset through tfds.data_source
                                     (no TensorFlow); SPLIT defaults to `train`
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from distillm2_jax.data.tfds_io import data_source
from distillm2_jax.errors import UserError
from distillm2_jax.jsonio import first_line, open_text, parse_json, read_json_file


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as read from a source: its position, a human-readable location, the dict."""

    index: int
    where: str
    data: dict


@dataclasses.dataclass
class MalformedCounter:
    """Counts records skipped under `skip_malformed` (callers report it; nothing vanishes)."""

    count: int = 0
    first_errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)


# --------------------------------------------------------------------------- JSON / JSONL


def _first_char(path: str) -> str:
    with open_text(path) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def iter_json_records(
    path: str, *, skip_malformed: bool = False, counter: MalformedCounter | None = None
) -> Iterator[RawRecord]:
    """Yield the objects of a JSONL file or of a JSON array file (sniffed by the first character).

    JSONL errors name `path:LINE`; JSON-array errors name the record index (and, for a syntax
    error, the line json reports). With `skip_malformed`, bad JSONL lines and non-object
    records are counted in `counter` instead of raising; a broken JSON array cannot be skipped.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    first = _first_char(path)
    counter = counter if counter is not None else MalformedCounter()
    if first == "[":
        try:
            with open_text(path) as f:
                items = parse_json(f.read(), path)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON array: {err.msg}") from None
        for i, item in enumerate(items):
            where = f"{path} record {i}"
            if not isinstance(item, dict):
                msg = f"{where}: expected a JSON object, got {type(item).__name__}"
                if not skip_malformed:
                    raise UserError(msg)
                counter.add(msg)
                continue
            yield RawRecord(i, where, item)
        return
    index = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = parse_json(line, where)
            except (json.JSONDecodeError, UserError) as err:
                msg = (f"{where}: invalid JSON ({err.msg} at column {err.colno})"
                       if isinstance(err, json.JSONDecodeError) else str(err))
                if not skip_malformed:
                    raise UserError(msg) from None
                counter.add(msg)
                continue
            if not isinstance(obj, dict):
                msg = f"{where}: expected a JSON object, got {type(obj).__name__}"
                if not skip_malformed:
                    raise UserError(msg)
                counter.add(msg)
                continue
            yield RawRecord(index, where, obj)
            index += 1


# --------------------------------------------------------------------------- arrow / parquet


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(
            "reading parquet files or Hugging Face saved datasets needs pyarrow, which is not "
            "installed (pip install pyarrow), or convert the data to JSONL"
        ) from None
    return pyarrow


def _read_arrow_file(path: str):
    """An arrow IPC stream (what datasets writes) or IPC file; damage is a UserError."""
    pa = _pyarrow()
    try:
        try:
            with pa.memory_map(path) as source:
                return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(path) as source:
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: cannot read arrow data ({first_line(err)})") from None


def _table_records(table, label: str) -> Iterator[RawRecord]:
    try:
        rows = table.to_pylist()
    except Exception as err:  # noqa: BLE001 (pyarrow: any damage found only on conversion)
        raise UserError(f"{label}: cannot read the table's values ({first_line(err)})") from None
    for i, row in enumerate(rows):
        yield RawRecord(i, f"{label} record {i}", row)


def iter_parquet_records(path: str) -> Iterator[RawRecord]:
    """Yield rows of a parquet file, or of all `*.parquet` files of a folder in name order."""
    pa = _pyarrow()
    files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
    if not files:
        raise UserError(f"{path}: no *.parquet files in this folder")
    tables = []
    for f in files:
        try:
            tables.append(pa.parquet.read_table(f))
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{f}: cannot read parquet ({first_line(err)})") from None
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as err:
        raise UserError(f"{path}: parquet files with incompatible columns ({err})") from None
    yield from _table_records(table, path)


def _hf_split_dir(path: str) -> str:
    """A `save_to_disk` folder: the split folder itself, or `train` of a DatasetDict folder."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    dict_json = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dict_json):
        meta = read_json_file(dict_json)
        splits = meta.get("splits", []) if isinstance(meta, dict) else None
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise UserError(f"{dict_json}: field `splits`: expected a list of split names")
        if "train" in splits:
            return os.path.join(path, "train")
        names = ", ".join(os.path.join(path, s) for s in splits)
        raise UserError(
            f"{path}: a DatasetDict folder without a `train` split; name a split folder, "
            f"one of: {names if len(names) < 500 else names[:500] + '...'}"
        )
    raise UserError(
        f"{path}: not a Hugging Face saved dataset (no state.json or dataset_dict.json) and "
        "no *.parquet files"
    )


def iter_hf_disk_records(path: str) -> Iterator[RawRecord]:
    """Yield rows of a `datasets.Dataset.save_to_disk` folder (arrow files read with pyarrow)."""
    pa = _pyarrow()
    split_dir = _hf_split_dir(path)
    state_path = os.path.join(split_dir, "state.json")
    state = read_json_file(state_path)
    if not isinstance(state, dict):
        raise UserError(f"{state_path}: expected a JSON object, got {type(state).__name__}")
    if state.get("_indices_data_files"):
        raise UserError(f"{state_path}: datasets with an indices mapping are not supported; "
                        "call .flatten_indices() before save_to_disk")
    data_files = state.get("_data_files") or []
    if not (isinstance(data_files, list) and all(
            isinstance(d, dict) and isinstance(d.get("filename"), str)
            and 0 < len(d["filename"]) < 256 for d in data_files)):
        raise UserError(f"{state_path}: field `_data_files`: expected a list of "
                        '{"filename": FILE_NAME} objects')
    files = [os.path.join(split_dir, d["filename"]) for d in data_files]
    if not files:
        files = sorted(glob.glob(os.path.join(split_dir, "*.arrow")))
    if not files:
        raise UserError(f"{split_dir}: no arrow files")
    tables = [_read_arrow_file(f) for f in files]
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise UserError(f"{split_dir}: arrow files with different columns ({err})") from None
    yield from _table_records(table, split_dir)


# --------------------------------------------------------------------------- TFDS

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A parsed `tfds:NAME[:VERSION][:SPLIT][@DATA_DIR]` spec."""

    name: str
    split: str = "train"
    data_dir: str | None = None


def parse_tfds_spec(spec: str) -> TfdsSpec:
    """Parse `tfds:NAME[:VERSION][:SPLIT][@DATA_DIR]` (NAME may be `name/config`)."""
    if not spec.startswith("tfds:"):
        raise UserError(f"{spec}: a TFDS spec starts with `tfds:`")
    body, _, data_dir = spec[len("tfds:"):].partition("@")
    parts = body.split(":")
    if not parts[0]:
        raise UserError(f"{spec}: missing dataset name (tfds:NAME[:VERSION][:SPLIT][@DATA_DIR])")
    name, split = parts[0], "train"
    rest = parts[1:]
    if rest and _VERSION_RE.match(rest[0]):
        name = f"{name}:{rest.pop(0)}"
    if rest:
        split = rest.pop(0)
    if rest or not split:
        raise UserError(f"{spec}: expected tfds:NAME[:VERSION][:SPLIT][@DATA_DIR]")
    return TfdsSpec(name=name, split=split, data_dir=data_dir or None)


def to_python(value: Any) -> Any:
    """numpy/bytes values from a TFDS data source -> plain Python (str, int, list, dict)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [to_python(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


def open_tfds(spec: TfdsSpec):
    """`tfds.data_source(...)` for a spec: random access to an array_record dataset, no TF."""
    return data_source(spec.name, split=spec.split, data_dir=spec.data_dir)


def iter_tfds_records(spec_str: str) -> Iterator[RawRecord]:
    """Yield the records of a TFDS array_record dataset as plain Python dicts."""
    spec = parse_tfds_spec(spec_str)
    src = open_tfds(spec)
    label = f"tfds:{spec.name}:{spec.split}"
    for i in range(len(src)):
        where, row = f"{label} record {i}", src[i]
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a dict of features, got {type(row).__name__}")
        data = {}
        for key, value in row.items():
            try:
                data[key] = to_python(value)
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: field `{key}`: not UTF-8 text ({err.reason} at byte "
                                f"{err.start})") from None
        yield RawRecord(i, where, data)


# --------------------------------------------------------------------------- dispatch


def iter_records(spec: str | os.PathLike, *, skip_malformed: bool = False,
                 counter: MalformedCounter | None = None) -> Iterator[RawRecord]:
    """Yield the raw records of any supported source spec (see the module docstring)."""
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        yield from iter_tfds_records(spec)
        return
    path = spec
    if os.path.isdir(path):
        if glob.glob(os.path.join(path, "*.parquet")):
            yield from iter_parquet_records(path)
        else:
            yield from iter_hf_disk_records(path)
        return
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if path.endswith(".parquet"):
        yield from iter_parquet_records(path)
    elif path.endswith(".arrow"):
        yield from _table_records(_read_arrow_file(path), path)
    else:
        yield from iter_json_records(path, skip_malformed=skip_malformed, counter=counter)
