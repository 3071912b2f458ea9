"""Prompt sources: every input format, stable ids, prompt keys, and errors that name the place."""
import json
import os

import numpy as np
import pytest

from distillm2_jax.data.records import parse_tfds_spec
from distillm2_jax.data.sources import load_prompts, shard_prompts
from distillm2_jax.errors import UserError

ROWS = [
    {"prompt": "What is 2 + 2?"},
    {"instruction": "Translate to French.", "input": "Good morning"},
    {"instruction": "Write a poem.", "input": ""},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "reference answer, dropped"}]},
]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def check_rows(prompts):
    assert [p.id for p in prompts] == ["0", "1", "2", "3"]
    assert [p.index for p in prompts] == [0, 1, 2, 3]
    assert prompts[0].prompt == "What is 2 + 2?"
    assert prompts[0].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert prompts[0].key == "What is 2 + 2?"
    assert prompts[1].prompt == "Translate to French.\n\nGood morning"
    assert prompts[2].prompt == "Write a poem."  # empty input adds nothing
    assert prompts[3].messages == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi!"}]
    assert prompts[3].prompt == prompts[3].messages
    assert prompts[3].key == json.dumps([["system", "Be brief."], ["user", "Hi!"]])


def test_jsonl_all_prompt_fields(tmp_path):
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", ROWS))
    check_rows(prompts)
    assert prompts[1].where.endswith("p.jsonl:2")


def test_json_array_and_limit(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS, indent=2))
    check_rows(load_prompts(str(path)))
    assert len(load_prompts(str(path), limit=2)) == 2


def test_jsonl_blank_lines_keep_ids_dense(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], "", ROWS[1]])
    assert [p.id for p in load_prompts(path)] == ["0", "1"]


def test_parquet_file_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"prompt": ["a?", "b?", "c?"]})
    pq.write_table(table, tmp_path / "x.parquet")
    assert [p.prompt for p in load_prompts(str(tmp_path / "x.parquet"))] == ["a?", "b?", "c?"]
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["b1"]}), folder / "part-1.parquet")
    pq.write_table(pa.table({"prompt": ["a0"]}), folder / "part-0.parquet")
    assert [p.prompt for p in load_prompts(str(folder))] == ["a0", "b1"]


def _save_to_disk_layout(split_dir, table):
    """The folder layout `datasets.Dataset.save_to_disk` writes (arrow IPC stream + json)."""
    pa = pytest.importorskip("pyarrow")
    os.makedirs(split_dir)
    with pa.OSFile(os.path.join(split_dir, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(split_dir, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                   "_fingerprint": "0", "_format_type": None, "_split": "train"}, f)
    with open(os.path.join(split_dir, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)


def test_hf_saved_dataset_and_dataset_dict(tmp_path):
    pa = pytest.importorskip("pyarrow")
    messages = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "x"}],
                [{"role": "user", "content": "bye"}]]
    _save_to_disk_layout(str(tmp_path / "ds"), pa.table({"messages": messages}))
    prompts = load_prompts(str(tmp_path / "ds"))
    assert [p.key for p in prompts] == ["hello", "bye"]
    # DatasetDict folder: the train split is picked; another split by its folder.
    root = tmp_path / "dd"
    _save_to_disk_layout(str(root / "train"), pa.table({"prompt": ["t0", "t1"]}))
    _save_to_disk_layout(str(root / "test"), pa.table({"prompt": ["e0"]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [p.prompt for p in load_prompts(str(root))] == ["t0", "t1"]
    assert [p.prompt for p in load_prompts(str(root / "test"))] == ["e0"]


def test_tfds_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from distillm2_jax.data.tfds_io import write_array_record_dataset

    features = tfds.features.FeaturesDict({
        "prompt": tfds.features.Text(),
        "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                            "content": tfds.features.Text()}),
    })
    rows = [{"prompt": f"q{i}", "messages": [{"role": "user", "content": f"m{i}"}]} for i in range(5)]
    write_array_record_dataset("prompts_ds", str(tmp_path), features, {"train": rows, "test": rows[:2]})
    got = load_prompts(f"tfds:prompts_ds@{tmp_path}")
    assert [p.prompt for p in got] == [f"q{i}" for i in range(5)]
    assert [p.id for p in got] == [str(i) for i in range(5)]
    got = load_prompts(f"tfds:prompts_ds:1.0.0:test@{tmp_path}", field="messages")
    assert [p.key for p in got] == ["m0", "m1"]
    with pytest.raises(UserError, match="tfds:no_such_ds:train"):
        load_prompts(f"tfds:no_such_ds@{tmp_path}")


def test_parse_tfds_spec():
    s = parse_tfds_spec("tfds:name/config:1.2.3:validation@/data/dir")
    assert (s.name, s.split, s.data_dir) == ("name/config:1.2.3", "validation", "/data/dir")
    s = parse_tfds_spec("tfds:name")
    assert (s.name, s.split, s.data_dir) == ("name", "train", None)
    with pytest.raises(UserError):
        parse_tfds_spec("tfds::train")


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "ok"', r"p\.jsonl:3: invalid JSON"),
    ('["not", "an", "object"]', r"p\.jsonl:3: expected a JSON object"),
    ('{"text": "no prompt field"}', r"p\.jsonl:3: no prompt field"),
    ('{"prompt": 42}', r"p\.jsonl:3: field `prompt`"),
    ('{"instruction": ["x"]}', r"p\.jsonl:3: field `instruction`"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}',
     r"p\.jsonl:3: field `messages\[1\]\.role`"),
    ('{"messages": [{"role": "user", "content": null}]}', r"p\.jsonl:3: field `messages\[0\]\.content`"),
    ('{"messages": [{"role": "system", "content": "only system"}]}',
     r"p\.jsonl:3: field `messages`: a prompt must end with a user message"),
    ('{"messages": []}', r"p\.jsonl:3: field `messages`"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], ROWS[1], bad_line, ROWS[2]])
    with pytest.raises(UserError, match=message):
        load_prompts(path)


def test_malformed_json_array_names_record_index(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([ROWS[0], {"prompt": None, "messages": 5}]))
    with pytest.raises(UserError, match=r"p\.json record 1: field `messages`"):
        load_prompts(str(path))
    path.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(UserError, match=r"p\.json:2: invalid JSON"):
        load_prompts(str(path))


def test_data_is_never_evaluated(tmp_path):
    text = "__import__('os').system('echo pwned') or {'a': 1}"
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": text}]))
    assert prompts[0].prompt == text


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face saved dataset"):
        load_prompts(str(tmp_path / "emptydir"))


def test_shard_prompts_is_a_disjoint_cover(tmp_path):
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i)} for i in range(7)]))
    shards = [shard_prompts(prompts, i, 3) for i in range(3)]
    ids = sorted(int(p.id) for s in shards for p in s)
    assert ids == list(range(7))
    assert np.all([len(s) for s in shards] == np.array([3, 2, 2]))
