"""Fuzz the public readers: malformed input must end in a one-line `UserError` naming the file.

Hypothesis mutates valid inputs (pair / generation / prompt JSONL and JSON-array files, parquet
and HF saved-dataset folders, TFDS records, YAML configs, model and tokenizer folders): nesting
10^4-10^5 deep, truncation, invalid UTF-8, NaN / Infinity / huge numbers, wrong or missing
fields, huge lines, binary junk. Every reader must succeed or raise `UserError` whose message is
one short line containing the file (or spec) name; any other exception fails the test.
Each test checks that it generated its QUOTA of inputs, and the quotas add up to >= 1000.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillm2_jax import config
from distillm2_jax.data import records
from distillm2_jax.data.eval_records import read_eval_records
from distillm2_jax.data.generations import read_generations
from distillm2_jax.data.pairs import build_pairs, read_pairs
from distillm2_jax.data.prompts import load_templated_prompts
from distillm2_jax.data.sources import load_prompts
from distillm2_jax.errors import UserError

# Inputs each test generates. Every test checks that it generated its quota in the process that
# ran it (the suite runs under xdist, so no one process sees every test); the quotas add up to
# the >= 1000 malformed inputs the readers must survive.
QUOTA = {"pairs": 220, "generations": 220, "prompts": 180, "folders": 120, "tfds": 60, "config": 180,
         "model": 80, "tokenizer": 80}
COUNTS: dict[str, int] = {}  # kind -> inputs generated in this process
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck))
MAX_MESSAGE = 1000  # "one short line": besides file names, location + field + a little context


def check(call, *names) -> None:
    """Run one reader on one input: it may succeed, else raise a one-line UserError naming it.

    Any other exception propagates, and hypothesis reports it with the input that caused it.
    """
    try:
        call()
    except UserError as err:
        msg = str(err)
        assert "\n" not in msg and len(msg) < MAX_MESSAGE + 2 * sum(len(str(n)) for n in names), msg[:500]
        assert any(str(n) in msg for n in names), msg[:500]


def count(kind: str) -> None:
    """One more generated input of `kind` (a QUOTA key)."""
    COUNTS[kind] = COUNTS.get(kind, 0) + 1


@pytest.fixture(autouse=True)
def _quota_reached():
    """After each test: every kind it generated reached its quota (hypothesis ran them all)."""
    before = dict(COUNTS)
    yield
    for kind, n in COUNTS.items():
        if n != before.get(kind, 0):
            assert n - before.get(kind, 0) >= QUOTA[kind], (kind, n - before.get(kind, 0))


def test_quotas_add_up_to_1000_inputs():
    assert sum(QUOTA.values()) >= 1000


# --------------------------------------------------------------------------- valid inputs

U = {"role": "user", "content": "Say hi."}
FP = "vocab-sha256:0123456789abcdef"
GENERATIONS = [
    {"id": "0", "prompt": "Say hi.", "response": "hi", "finish_reason": "stop", "prompt_tokens": 3,
     "response_tokens": 3, "response_ids": [5, 6], "tokenizer": FP},
    {"id": 1, "prompt": [{"role": "system", "content": "Be brief."}, U], "response": "1 2",
     "finish_reason": "length", "prompt_tokens": 9, "response_tokens": 2, "response_ids": [7, 8],
     "tokenizer": FP, "model": "m", "seed": 1},
    {"prompt": "Say hi.", "format_prompt": "<user>Say hi.", "generated_text": "hey"},
]
PAIRS = [
    {"prompt": "Say hi.", "chosen": [U, {"role": "assistant", "content": "hi"}],
     "rejected": [U, {"role": "assistant", "content": "yo"}], "chosen_ids": [5, 6],
     "chosen_tokenizer": FP, "rejected_ids": [7], "rejected_tokenizer": FP},
    {"prompt": "Q?", "chosen": "good", "rejected": "bad", "answer": 72.0},
]
PROMPTS = [
    {"prompt": "Say hi.", "answer": "2"},
    {"messages": [{"role": "system", "content": "Be brief."}, U,
                  {"role": "assistant", "content": "hi"}]},
    {"instruction": "Add.", "input": "1 2"},
]

# --------------------------------------------------------------------------- mutations

DEEP = st.one_of(
    st.integers(10_000, 100_000).map(lambda n: "[" * n + "]" * n),
    st.integers(10_000, 100_000).map(lambda n: '{"a": ' * n + "1" + "}" * n),
    st.integers(10_000, 100_000).map(lambda n: "[" * n),  # deep and truncated
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
).map(json.dumps)  # json.dumps writes NaN / Infinity for non-finite floats
JUNK_JSON = st.one_of(
    st.sampled_from([
        "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-1", "0", "1.5", "2.0", "true",
        "null", '""', '"x"', "[]", "{}", "[NaN]", "[Infinity]", "[-1]", "[1.5]", "[2.0]", '["7"]',
        "[true]", "[null]", "[[1]]", "[{}]", "9" * 30, "[" + "9" * 30 + "]", "[2147483648]",
        "9" * 5000, "[" + "9" * 5000 + "]", "-" + "9" * 5000, "1" + "0" * 400 + ".5",
        '"\\ud800"', '["\\udfff"]', '"\\u0000"', '[{"role": "user"}]',
        '[{"role": "user", "content": NaN}]', '[{"role": "bot", "content": "x"}]',
        '{"role": ["user"], "content": ["a", "b"]}', '{"role": "user", "content": 1}',
    ]),
    DEEP,
    JSON_VALUES,
    st.integers(100_000, 1_000_000).map(lambda n: json.dumps("x" * n)),
)
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80", b"\xc0\xaf",
            b"\xf8\x88\x80\x80\x80"]
MARK = "\x00fuzz-mark\x00"


def paths(value, prefix=()):
    """Every key / index path inside a JSON value, the root included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        yield from paths(v, prefix + (k,))


def set_path(value, path, new):
    if not path:
        return new
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = new
    return value


@st.composite
def mutated_json(draw, base: dict) -> str:
    """One JSON text: `base` kept, with a field deleted, or with a field set to junk JSON."""
    value = copy.deepcopy(base)
    op = draw(st.sampled_from(["keep", "set", "set", "set", "delete"]))
    if op == "keep":
        return json.dumps(value)
    path = draw(st.sampled_from(list(paths(value))))
    if op == "delete" and path:
        parent = value
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        return json.dumps(value)
    return json.dumps(set_path(value, path, MARK)).replace(json.dumps(MARK), draw(JUNK_JSON))


@st.composite
def byte_edit(draw, data: bytes, huge: int = 2_000_000) -> bytes:
    """Damage raw bytes: truncate, invalid UTF-8, junk, a huge or deep line, a BOM, emptiness."""
    pos = draw(st.integers(0, len(data)))
    kind = draw(st.sampled_from(["truncate", "utf8", "junk", "huge", "deep", "bom", "empty"]))
    if kind == "truncate":
        return data[:pos]
    if kind == "utf8":
        return data[:pos] + draw(st.sampled_from(BAD_UTF8)) + data[pos:]
    if kind == "junk":
        return data[:pos] + draw(st.binary(min_size=1, max_size=32)) + data[pos:]
    if kind == "huge":
        n = draw(st.integers(huge // 20, huge))
        return data[:pos] + b'\n{"prompt": "' + b"y" * n + b'"}\n' + data[pos:]
    if kind == "deep":
        return data[:pos] + draw(DEEP).encode() + data[pos:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    return draw(st.sampled_from([b"", b"\n", b"  \n\t\n", b"\xef\xbb\xbf"]))


@st.composite
def json_file(draw, base: list[dict], *, lines: bool = True) -> bytes:
    """A JSONL file (or JSON array, or one JSON document) of mutated records, maybe damaged."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256))
    if lines:
        texts = [draw(mutated_json(draw(st.sampled_from(base))))
                 for _ in range(draw(st.integers(1, 4)))]
        as_array = draw(st.integers(0, 4)) == 0
        text = "[" + ",\n".join(texts) + "]\n" if as_array else "\n".join(texts) + "\n"
    else:
        text = draw(mutated_json(base[0]))
    data = text.encode()
    for _ in range(draw(st.integers(0, 2))):
        data = draw(byte_edit(data))
    return data


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A module-wide folder (hypothesis runs many examples per test call)."""
    d = tmp_path_factory.mktemp("fuzz")
    write(d / "good_gen.jsonl", "".join(json.dumps(g) + "\n" for g in GENERATIONS).encode())
    return d


# --------------------------------------------------------------------------- data files


@settings(max_examples=QUOTA["pairs"], **FUZZ)
@given(data=json_file(PAIRS))
def test_pair_files(work, data):
    count("pairs")
    path = write(work / "pairs.jsonl", data)
    check(lambda: read_pairs(path), path)
    check(lambda: read_pairs(path, skip_malformed=True), path)
    check(lambda: read_eval_records(path), path)


@settings(max_examples=QUOTA["generations"], **FUZZ)
@given(data=json_file(GENERATIONS))
def test_generation_files(work, data):
    count("generations")
    path = write(work / "gen.jsonl", data)
    good = str(work / "good_gen.jsonl")
    check(lambda: read_generations(path), path)
    check(lambda: read_generations(path, skip_malformed=True), path)
    check(lambda: build_pairs(path, good, str(work / "out.jsonl")), path)
    check(lambda: build_pairs(good, path, str(work / "out.jsonl"), skip_malformed=True), path)
    check(lambda: read_eval_records(path), path)


@settings(max_examples=QUOTA["prompts"], **FUZZ)
@given(data=json_file(PROMPTS))
def test_prompt_files(work, tokenizer, data):
    count("prompts")
    path = write(work / "prompts.json", data)
    check(lambda: load_prompts(path), path)
    check(lambda: load_prompts(path, field="messages", limit=2), path)
    check(lambda: load_templated_prompts(path, tokenizer, max_prompt_length=16), path)
    check(lambda: read_eval_records(path), path)


# --------------------------------------------------------------------------- folders, TFDS

PY_JUNK = st.sampled_from([float("nan"), float("inf"), -1, 1.5, 2**62, True, None, "x", b"\xff",
                           [], [1.5], [-1], [float("nan")], [None], {"a": 1}, [[1]]])


@st.composite
def dataset_folder(draw, root) -> str:
    """A parquet / arrow file, parquet folder or `save_to_disk` folder, valid or damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = copy.deepcopy(draw(st.sampled_from(PROMPTS + PAIRS)))
    key = draw(st.sampled_from(sorted(base)))
    if draw(st.booleans()):
        base[key] = draw(PY_JUNK)
    table = pa.Table.from_pylist([base])
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root / "train")
    kind = draw(st.sampled_from(["parquet", "parquet_dir", "arrow", "hf", "hf_dict"]))
    sink = pa.BufferOutputStream()
    if kind.startswith("parquet"):
        pq.write_table(table, sink)
    else:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    payload = sink.getvalue().to_pybytes()
    if draw(st.booleans()):
        payload = draw(byte_edit(payload))
    if kind == "parquet":
        return write(root / "d.parquet", payload)
    if kind == "parquet_dir":
        write(root / "a.parquet", payload)
        return str(root)
    if kind == "arrow":
        return write(root / "d.arrow", payload)
    split = root / "train" if kind == "hf_dict" else root
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "f"}
    write(split / "data-00000-of-00001.arrow", payload)
    write(split / "state.json", draw(json_file([state], lines=False)))
    if kind == "hf_dict":
        write(root / "dataset_dict.json", draw(json_file([{"splits": ["train"]}], lines=False)))
    return str(root)


@settings(max_examples=QUOTA["folders"], **FUZZ)
@given(data=st.data())
def test_dataset_folders(work, data):
    spec = data.draw(dataset_folder(work / "ds"))
    count("folders")
    check(lambda: load_prompts(spec), spec)
    check(lambda: read_pairs(spec), spec)


NP_JUNK = st.sampled_from([b"\xff\xfe", np.array([b"ok", b"\xc3\x28"]), np.float32("nan"),
                           np.array([1.5, np.inf]), np.int64(-3), np.array([-1, 2]), b"Say hi.",
                           np.array([b"user", b"assistant"]), {"role": np.array([b"user"])}])


@settings(max_examples=QUOTA["tfds"], **FUZZ)
@given(rows=st.lists(st.dictionaries(st.sampled_from(["prompt", "messages", "chosen", "rejected",
                                                      "chosen_ids", "chosen_tokenizer"]),
                                     NP_JUNK, max_size=4) | NP_JUNK, max_size=3),
       name=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12))
def test_tfds_records(rows, name):
    """TFDS records as numpy/bytes values (a stub data source) and odd `tfds:` specs."""
    count("tfds")
    with mock.patch.object(records, "open_tfds", lambda spec: rows):
        check(lambda: load_prompts("tfds:fuzz"), "tfds:fuzz")
        check(lambda: read_pairs("tfds:fuzz:test"), "tfds:fuzz")
    spec = f"tfds:{name}"
    check(lambda: records.parse_tfds_spec(spec), spec)


# --------------------------------------------------------------------------- YAML configs

DEFAULT_YAML = (Path(__file__).parents[2] / "configs" / "default.yaml").read_text().splitlines()
JUNK_YAML = st.one_of(
    st.sampled_from([
        ".nan", ".inf", "-.inf", "1e999", "9" * 5000, "-1", "0", "1.5", "true", "null", "'x'",
        "[1, 2]", "{a: 1}", "[", "{", "]", "'", '"', "!!python/object/apply:os.system ['true']",
        "!!binary AAAA", "*nope", "&a [*a]", "&b {x: *b}", "2001-02-30", "0x", "0o9", "~", "@x",
        "`x", "%YAML 1.1", "- a", "? x", "a: b: c", "- - -", "!!float x", "!!int 1.5",
        "!!timestamp 2001-13-45", "\t1", "\"\\ud800\"",
    ]),
    # deep flow maps; deep flow lists take pure-Python yaml ~1 s each, so they are left out
    st.integers(10_000, 100_000).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.text(max_size=20),
)


@st.composite
def yaml_file(draw) -> bytes:
    """configs/default.yaml with key lines given junk values, deleted, re-indented or repeated,
    maybe damaged as bytes; or binary junk."""
    lines = list(DEFAULT_YAML)
    for _ in range(draw(st.integers(1, 3))):
        keyed = [i for i, line in enumerate(lines) if re.match(r"\s*\w+:", line)]
        i = draw(st.sampled_from(keyed))
        op = draw(st.sampled_from(["value", "value", "value", "delete", "indent", "dup"]))
        if op == "value":
            lines[i] = f"{lines[i].partition(':')[0]}: {draw(JUNK_YAML)}"
        elif op == "delete":
            del lines[i]
        elif op == "indent":
            lines[i] = draw(st.sampled_from([" ", "   ", "\t"])) + lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
    data = ("\n".join(lines) + "\n").encode()
    for _ in range(draw(st.integers(0, 1))):
        data = draw(byte_edit(data, huge=20_000))  # pure-Python yaml: ~5 us a character
    return data if draw(st.integers(0, 9)) else draw(st.binary(max_size=256))


@settings(max_examples=QUOTA["config"], **FUZZ)
@given(data=yaml_file())
def test_yaml_configs(work, data):
    count("config")
    path = write(work / "run.yaml", data)
    check(lambda: config.load(path, require=False), path)


# --------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny qwen2 model folder and a tiny tokenizer folder to mutate (nothing downloaded)."""
    from safetensors import safe_open

    from distillm2_jax import models
    from distillm2_jax.hf import save_pretrained
    from distillm2_jax.toy import VOCAB_SIZE, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("fuzz_models")
    model = models.from_config(dict(
        model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    save_pretrained(model, root / "model")
    with safe_open(str(root / "model" / "model.safetensors"), framework="numpy") as f:
        index = {"metadata": {}, "weight_map": {name: "model.safetensors" for name in f.keys()}}
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps(index))  # sharded form
    build_tiny_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def tokenizer(model_dirs):
    """The tiny tokenizer, for `load_templated_prompts`."""
    from distillm2_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(str(model_dirs / "tokenizer"))


@st.composite
def damaged_folder(draw, src, dst, json_names) -> str:
    """A copy of `src` with one of `json_names` mutated, or a file deleted or damaged."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    files = sorted(os.listdir(dst))
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["json", "json", "json", "delete", "bytes"]))
        name = draw(st.sampled_from(json_names if op == "json" else files))
        if not os.path.exists(dst / name):
            continue
        if op == "json":
            base = json.loads((src / name).read_text(encoding="utf-8"))
            write(dst / name, draw(json_file([base], lines=False)))
        elif op == "delete":
            os.remove(dst / name)
        else:
            write(dst / name, draw(byte_edit((dst / name).read_bytes())))
    return str(dst)


def _load_model(path):
    from distillm2_jax.hf import from_pretrained

    return from_pretrained(path)


def _load_tokenizer(path):
    from distillm2_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


FOLDERS = {"model": (_load_model, ["config.json", "model.safetensors.index.json"]),
           "tokenizer": (_load_tokenizer, ["tokenizer.json", "tokenizer_config.json"])}


@pytest.mark.parametrize("kind", list(FOLDERS))
@settings(max_examples=QUOTA["model"], **FUZZ)  # = QUOTA["tokenizer"]
@given(data=st.data())
def test_model_and_tokenizer_folders(model_dirs, kind, data):
    load, json_names = FOLDERS[kind]
    path = data.draw(damaged_folder(model_dirs / kind, model_dirs / kind[0], json_names))
    count(kind)
    check(lambda: load(path), path)
