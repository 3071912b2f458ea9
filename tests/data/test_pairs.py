"""`distillm2 pair`: matching by prompt, both input formats, malformed lines, counts, the CLI."""
import json

import pytest

from distillm2_jax import cli
from distillm2_jax.data.generations import make_generation_record, read_generations
from distillm2_jax.data.pairs import PairStats, build_pairs, parse_pair, read_pairs
from distillm2_jax.errors import UserError

CONVO = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]


def gen(i, prompt, response, finish="stop"):
    return make_generation_record(id=str(i), prompt=prompt, response=response, finish_reason=finish,
                                  prompt_tokens=5, response_tokens=3, model="m")


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_out(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_pairs_from_generation_outputs(tmp_path):
    teacher = write_lines(tmp_path / "t.jsonl", [gen(0, "What is 2+2?", "4."), gen(1, CONVO, "Blue."),
                                                 gen(2, "Hi", "Hello!")])
    student = write_lines(tmp_path / "s.jsonl", [gen(2, "Hi", "hey"), gen(1, CONVO, "red I think"),
                                                 gen(0, [{"role": "user", "content": "What is 2+2?"}], "5")])
    stats = build_pairs(teacher, student, str(tmp_path / "pairs.jsonl"))
    assert stats == PairStats(teacher_records=3, student_records=3, pairs=3)
    out = read_out(tmp_path / "pairs.jsonl")
    assert out[0] == {  # teacher order; a string prompt matches the same text as messages
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
    }
    assert out[1]["prompt"] == "Name a colour."
    assert out[1]["chosen"] == CONVO + [{"role": "assistant", "content": "Blue."}]
    assert out[1]["rejected"] == CONVO + [{"role": "assistant", "content": "red I think"}]
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert [p.chosen for p in pairs] == ["4.", "Blue.", "Hello!"]
    assert pairs[1].messages == CONVO and pairs[2].rejected == "hey"


def test_authors_vllm_format(tmp_path):
    # The authors' generate_vllm.py writes a JSON array of {prompt, format_prompt, generated_text}.
    teacher = tmp_path / "output_42.json"
    teacher.write_text(json.dumps([
        {"prompt": "Tell a joke.", "format_prompt": "<|im_start|>user...", "generated_text": "Knock knock."},
        {"prompt": "Count to 3.", "format_prompt": "...", "generated_text": "1 2 3"},
    ], indent=4))
    student = write_lines(tmp_path / "s.jsonl", [
        {"prompt": "Count to 3.", "generated_text": "1 2"},
        {"prompt": "Tell a joke.", "format_prompt": "...", "generated_text": "No."},
    ])
    stats = build_pairs(str(teacher), student, str(tmp_path / "p.jsonl"))
    assert stats.pairs == 2
    out = read_out(tmp_path / "p.jsonl")
    assert [o["prompt"] for o in out] == ["Tell a joke.", "Count to 3."]
    assert out[1]["rejected"][-1] == {"role": "assistant", "content": "1 2"}


def test_unmatched_and_duplicates_are_counted(tmp_path):
    teacher = write_lines(tmp_path / "t.jsonl", [gen(0, "a", "A1"), gen(1, "b", "B1"), gen(2, "a", "A2"),
                                                 gen(3, "only teacher", "x")])
    student = write_lines(tmp_path / "s.jsonl", [gen(0, "a", "a1"), gen(1, "b", "b1"), gen(2, "b", "b2"),
                                                 gen(3, "b", "b3"), gen(4, "only student", "y"),
                                                 gen(5, "also only student", "z")])
    stats = build_pairs(teacher, student, str(tmp_path / "p.jsonl"))
    assert stats == PairStats(teacher_records=4, student_records=6, pairs=2, teacher_unmatched=1,
                              student_unmatched=2, teacher_duplicates=1, student_duplicates=2)
    out = read_out(tmp_path / "p.jsonl")
    # The first record of a duplicated prompt wins.
    assert [(o["chosen"][-1]["content"], o["rejected"][-1]["content"]) for o in out] == [("A1", "a1"), ("B1", "b1")]
    assert "1 unmatched" in stats.summary() and "2 duplicate prompts" in stats.summary()


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "x", "response": ', r"t\.jsonl:2: invalid JSON"),
    ('{"prompt": "x"}', r"t\.jsonl:2: missing field `response`"),
    ('{"response": "x"}', r"t\.jsonl:2: missing field `prompt`"),
    ('{"prompt": "x", "response": 3}', r"t\.jsonl:2: field `response`"),
    ('{"prompt": "x", "response": "y", "finish_reason": "eos"}', r"t\.jsonl:2: field `finish_reason`"),
    ('{"prompt": "x", "response": "y", "response_tokens": -1}', r"t\.jsonl:2: field `response_tokens`"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "response": "y"}', r"t\.jsonl:2: field `prompt\[0\]\.role`"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    teacher = write_lines(tmp_path / "t.jsonl", [gen(0, "a", "A"), bad, gen(2, "b", "B")])
    student = write_lines(tmp_path / "s.jsonl", [gen(0, "a", "a"), gen(1, "b", "b")])
    with pytest.raises(UserError, match=message):
        build_pairs(teacher, student, str(tmp_path / "p.jsonl"))
    assert not (tmp_path / "p.jsonl").exists()
    stats = build_pairs(teacher, student, str(tmp_path / "p.jsonl"), skip_malformed=True)
    assert (stats.teacher_malformed, stats.pairs, stats.teacher_records) == (1, 2, 2)


def test_no_match_is_an_error(tmp_path):
    teacher = write_lines(tmp_path / "t.jsonl", [gen(0, "a", "A")])
    student = write_lines(tmp_path / "s.jsonl", [gen(0, "b", "B")])
    with pytest.raises(UserError, match="no prompt .* matches"):
        build_pairs(teacher, student, str(tmp_path / "p.jsonl"))


def test_read_generations_keeps_extra_fields(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [gen(7, "q", "r", finish="length")])
    (g,) = read_generations(path)
    assert (g.id, g.prompt, g.response, g.finish_reason) == ("7", "q", "r", "length")
    assert g.extra == {"prompt_tokens": 5, "response_tokens": 3, "model": "m"}


def test_parse_pair_validation():
    user = {"role": "user", "content": "q"}
    ok = parse_pair({"prompt": "q", "chosen": [user, {"role": "assistant", "content": "A"}],
                     "rejected": [user, {"role": "assistant", "content": "B"}]}, "f:1")
    assert (ok.messages, ok.chosen, ok.rejected) == ([user], "A", "B")
    plain = parse_pair({"prompt": "q", "chosen": "A", "rejected": "B"}, "f:1")  # TRL standard format
    assert plain.messages == [user]
    with pytest.raises(UserError, match="f:3: fields `chosen` and `rejected` have different prompts"):
        parse_pair({"chosen": [user, {"role": "assistant", "content": "A"}],
                    "rejected": [{"role": "user", "content": "other"},
                                 {"role": "assistant", "content": "B"}]}, "f:3")
    with pytest.raises(UserError, match="f:4: field `chosen`: expected a conversation ending"):
        parse_pair({"chosen": [user], "rejected": [user]}, "f:4")
    with pytest.raises(UserError, match="f:5: missing field `rejected`"):
        parse_pair({"chosen": "A"}, "f:5")


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    assert "pair" in cli.COMMANDS
    monkeypatch.setattr(cli, "COMMANDS", ("pair",))  # independent of other subcommands' imports
    teacher = write_lines(tmp_path / "t.jsonl", [gen(0, "a", "A"), gen(1, "b", "B"), "{oops"])
    student = write_lines(tmp_path / "s.jsonl", [gen(0, "a", "a"), gen(1, "c", "c")])
    out = tmp_path / "pairs.jsonl"
    rc = cli.main(["pair", "--teacher", teacher, "--student", student, "--out", str(out)])
    assert rc == 2
    assert "t.jsonl:3: invalid JSON" in capsys.readouterr().err
    rc = cli.main(["pair", "--teacher", teacher, "--student", student, "--out", str(out),
                   "--skip-malformed"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "skipped" in captured.err and "t.jsonl:3" in captured.err
    assert "1 pairs written" in printed and "1 malformed skipped" in printed
    assert "1 unmatched" in printed
    assert len(read_out(out)) == 1
