"""Token-exact responses: sampled ids travel generation record -> pair file -> training labels.

The tiny tokenizer is a real byte-level BPE trained with `tokenizers` (distillm2_jax.toy), so
a token whose text is also the concatenation of two other tokens gives a non-canonical
sequence: the same text, other ids. A pipeline that re-encodes the text changes it.
"""
import json

import numpy as np
import pytest

from distillm2_jax.data.batches import PairTokenizer, check_stored_ids, make_batch
from distillm2_jax.data.generations import (make_generation_record, read_generations,
                                            tokenizer_fingerprint)
from distillm2_jax.data.loader import PairLoader
from distillm2_jax.data.pairs import Pair, build_pairs, read_pairs
from distillm2_jax.errors import UserError
from tests.tiny_tokenizer import EOS_ID, tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401

PROMPT = "Write a short poem about the sea."
TEACHER = "The teacher answers with a short poem about the sea."
STUDENT = "The student writes about the sea."


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def non_canonical(tok, text):
    """`text`'s ids with every splittable token split in two vocabulary tokens: decodes to the
    same text, but is not what encoding the text gives."""
    vocab = tok.get_vocab()
    out = []
    for i in encode(tok, text):
        t = tok.convert_ids_to_tokens(i)
        split = next(((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab), None)
        out += [vocab[split[0]], vocab[split[1]]] if split else [i]
    assert tok.decode(out) == text
    assert encode(tok, tok.decode(out)) != out, "a re-encode must change it, else the test proves nothing"
    return out


def gen(tok, i, prompt, response, ids=None, fingerprint=None, finish="stop"):
    extra = {} if ids is None else dict(response_ids=ids, tokenizer=fingerprint or tokenizer_fingerprint(tok))
    n = len(ids if ids is not None else encode(tok, response)) + (finish == "stop")
    return make_generation_record(id=str(i), prompt=prompt, response=response, finish_reason=finish,
                                  prompt_tokens=5, response_tokens=n, **extra)


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def response_labels(batch, half, row=0):
    labels = batch["labels"][row, half]
    return labels[labels != -100].tolist()


def test_non_canonical_ids_survive_generation_pair_file_and_training_labels(
        tiny_tokenizer, tmp_path):  # noqa: F811
    tok = tiny_tokenizer
    t_ids, s_ids = non_canonical(tok, TEACHER), non_canonical(tok, STUDENT)
    teacher = write_lines(tmp_path / "t.jsonl", [gen(tok, 0, PROMPT, TEACHER, t_ids)])
    student = write_lines(tmp_path / "s.jsonl", [gen(tok, 0, PROMPT, STUDENT, s_ids)])
    assert read_generations(teacher)[0].response_ids == t_ids
    stats = build_pairs(teacher, student, str(tmp_path / "pairs.jsonl"))
    assert (stats.chosen_with_ids, stats.rejected_with_ids) == (1, 1)
    raw = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert raw["chosen_ids"] == t_ids and raw["rejected_ids"] == s_ids
    assert raw["chosen_tokenizer"] == raw["rejected_tokenizer"] == tokenizer_fingerprint(tok)
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert (pairs[0].chosen_ids, pairs[0].rejected_ids) == (t_ids, s_ids)
    assert check_stored_ids(tok, pairs).ids == 2
    # the trainer's loader and layout, and the rows layout of make_batch
    loader = PairLoader(pairs, tok, global_batch_size=1, max_length=96, max_prompt_length=48,
                        layout="shared_prompt", process_index=0, process_count=1, num_threads=1)
    batch = next(iter(loader))
    assert response_labels(batch, 0) == t_ids + [EOS_ID]
    assert response_labels(batch, 1) == s_ids + [EOS_ID]
    rows = make_batch(pairs, tok, max_length=96, max_prompt_length=48)
    lab = rows["labels"][1]
    assert lab[lab != -100].tolist() == s_ids + [EOS_ID]
    # the same files without ids: the text is re-encoded, which gives other labels
    teacher = write_lines(tmp_path / "t2.jsonl", [gen(tok, 0, PROMPT, TEACHER)])
    student = write_lines(tmp_path / "s2.jsonl", [gen(tok, 0, PROMPT, STUDENT)])
    build_pairs(teacher, student, str(tmp_path / "pairs2.jsonl"))
    text_batch = make_batch(read_pairs(str(tmp_path / "pairs2.jsonl")), tok, max_length=96,
                            max_prompt_length=48, layout="shared_prompt")
    assert response_labels(text_batch, 0) == encode(tok, TEACHER) + [EOS_ID] != t_ids + [EOS_ID]
    assert (text_batch["prompt_ids"] == batch["prompt_ids"]).all()


def test_text_only_files_tokenise_as_before(tiny_tokenizer, tmp_path):  # noqa: F811
    tok = tiny_tokenizer
    teacher = write_lines(tmp_path / "t.jsonl", [gen(tok, 0, PROMPT, TEACHER)])
    student = write_lines(tmp_path / "s.jsonl", [{"prompt": PROMPT, "generated_text": STUDENT}])  # vLLM
    stats = build_pairs(teacher, student, str(tmp_path / "p.jsonl"))
    assert (stats.chosen_with_ids, stats.rejected_with_ids) == (0, 0)
    raw = json.loads((tmp_path / "p.jsonl").read_text())
    assert set(raw) == {"prompt", "chosen", "rejected"}
    pairs = read_pairs(str(tmp_path / "p.jsonl"))
    usage = check_stored_ids(tok, pairs)
    assert (usage.ids, usage.text, usage.other_tokenizer) == (0, 2, 0)
    b = make_batch(pairs, tok, max_length=96, max_prompt_length=48, layout="shared_prompt")
    assert response_labels(b, 0) == encode(tok, TEACHER) + [EOS_ID]
    assert response_labels(b, 1) == encode(tok, STUDENT) + [EOS_ID]


def test_one_side_with_ids_and_ids_of_another_tokenizer(tiny_tokenizer, tmp_path):  # noqa: F811
    tok = tiny_tokenizer
    s_ids = non_canonical(tok, STUDENT)
    teacher = write_lines(tmp_path / "t.jsonl", [gen(tok, 0, PROMPT, TEACHER, non_canonical(tok, TEACHER),
                                                     fingerprint="vocab-sha256:another")])
    student = write_lines(tmp_path / "s.jsonl", [gen(tok, 0, PROMPT, STUDENT, s_ids)])
    build_pairs(teacher, student, str(tmp_path / "p.jsonl"))
    pairs = read_pairs(str(tmp_path / "p.jsonl"))
    assert pairs[0].chosen_tokenizer == "vocab-sha256:another"
    usage = check_stored_ids(tok, pairs)
    assert (usage.ids, usage.other_tokenizer, usage.text) == (1, 1, 0)
    b = make_batch(pairs, tok, max_length=96, max_prompt_length=48, layout="shared_prompt")
    assert response_labels(b, 0) == encode(tok, TEACHER) + [EOS_ID]   # not trusted: re-encoded
    assert response_labels(b, 1) == s_ids + [EOS_ID]
    # only the student had ids: only the rejected side carries them
    build_pairs(write_lines(tmp_path / "t2.jsonl", [gen(tok, 0, PROMPT, TEACHER)]), student,
                str(tmp_path / "p2.jsonl"))
    raw = json.loads((tmp_path / "p2.jsonl").read_text())
    assert "chosen_ids" not in raw and "chosen_tokenizer" not in raw and raw["rejected_ids"] == s_ids


def test_ids_that_do_not_decode_to_the_text_name_file_and_line(tiny_tokenizer, tmp_path):  # noqa: F811
    tok = tiny_tokenizer
    ok = gen(tok, 0, PROMPT, TEACHER, non_canonical(tok, TEACHER))
    wrong = gen(tok, 1, "Another prompt", STUDENT, encode(tok, STUDENT.replace("sea", "sky")))
    teacher = write_lines(tmp_path / "t.jsonl", [ok, wrong])
    student = write_lines(tmp_path / "s.jsonl", [gen(tok, 0, PROMPT, STUDENT),
                                                 gen(tok, 1, "Another prompt", "x")])
    build_pairs(teacher, student, str(tmp_path / "pairs.jsonl"))
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    where = f"{tmp_path / 'pairs.jsonl'}:2: field `chosen_ids` does not decode to the `chosen` text"
    with pytest.raises(UserError, match="^" + where.replace("(", r"\(").replace(")", r"\)")) as err:
        check_stored_ids(tok, pairs)
    assert f"first difference at character {STUDENT.index('sea') + 1}" in str(err.value)
    assert "sky." in str(err.value) and "sea." in str(err.value)
    with pytest.raises(UserError, match=r"pairs.jsonl:2: field `chosen_ids` does not decode"):
        PairTokenizer(tok, max_length=96, max_prompt_length=48)(pairs[1])
    PairTokenizer(tok, max_length=96, max_prompt_length=48)(pairs[0])   # the good line is fine
    # ids that end with the end-of-turn token, or leave the vocabulary
    bad_eot = Pair([{"role": "user", "content": "q"}], "a", "b", "x.jsonl:7",
                   chosen_ids=encode(tok, "a") + [EOS_ID], chosen_tokenizer=tokenizer_fingerprint(tok))
    with pytest.raises(UserError, match=r"^x.jsonl:7: field `chosen_ids` ends with the end-of-turn"):
        check_stored_ids(tok, [bad_eot])
    bad_vocab = Pair([{"role": "user", "content": "q"}], "a", "b", "x.jsonl:8", rejected_ids=[5, 4000],
                     rejected_tokenizer=tokenizer_fingerprint(tok))
    with pytest.raises(UserError, match=r"^x.jsonl:8: field `rejected_ids`: token id 4000 is outside"):
        make_batch([bad_vocab], tok, max_length=96, max_prompt_length=48)


@pytest.mark.parametrize("field,value,message", [
    ("response_ids", "1 2 3", r"field `response_ids`: expected a list of token ids, got str"),
    ("response_ids", [5, -3], r"field `response_ids`: item 1 is -3"),
    ("response_ids", [5, True], r"field `response_ids`: item 1 is True"),
    ("response_ids", [5, 1.5], r"field `response_ids`: item 1 is 1.5"),
    ("tokenizer", None, r"field `response_ids` needs `tokenizer`"),
    ("tokenizer", 7, r"field `tokenizer`: expected a tokenizer fingerprint"),
    ("response_tokens", 9, r"field `response_ids`: 2 ids but response_tokens=9 and finish_reason='stop' "
                           r"\(expected 8"),
])
def test_malformed_generation_ids_name_file_line_and_field(tmp_path, field, value, message):
    rec = {"id": "0", "prompt": "p", "response": "ab", "finish_reason": "stop", "prompt_tokens": 1,
           "response_tokens": 3, "response_ids": [5, 6], "tokenizer": "vocab-sha256:x"}
    rec[field] = value
    path = write_lines(tmp_path / "g.jsonl", [{"prompt": "q", "response": "fine"}, rec])
    with pytest.raises(UserError, match=f"^{path}:2: {message}"):
        read_generations(path)


@pytest.mark.parametrize("record,message", [
    ({"chosen_ids": [1, "2"]}, r"field `chosen_ids`: item 1 is '2'"),
    ({"rejected_ids": [1, 2]}, r"field `rejected_ids` needs `rejected_tokenizer`"),
    ({"chosen_ids": {"a": 1}, "chosen_tokenizer": "t"}, r"field `chosen_ids`: expected a list"),
])
def test_malformed_pair_ids_name_file_line_and_field(tmp_path, record, message):
    base = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "p.jsonl", [base, {**base, **record}])
    with pytest.raises(UserError, match=f"^{path}:2: {message}"):
        read_pairs(path)


def test_fingerprint_identifies_the_vocabulary(tiny_tokenizer, tiny_tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(tiny_tokenizer)
    assert fp.startswith("vocab-sha256:") and len(fp) == len("vocab-sha256:") + 16
    other = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    other.chat_template = None            # another template, the same ids
    assert tokenizer_fingerprint(other) == fp
    other.add_tokens(["<extra_token>"])   # the same object grown: recomputed, differs
    assert tokenizer_fingerprint(other) != fp
    assert tokenizer_fingerprint(tiny_tokenizer) == fp
    assert np.all(np.asarray(non_canonical(tiny_tokenizer, TEACHER)) < len(tiny_tokenizer))
