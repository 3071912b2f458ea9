"""Chat templating: rendered prompts, no double BOS, END-keeping truncation, end-of-turn token."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from distillm2_jax.data import chat
from distillm2_jax.data.prompts import load_templated_prompts
from distillm2_jax.errors import UserError
from tests.tiny_tokenizer import (BOS_ID, EOS_ID, IM_START_ID, PAD_ID, build_tiny_tokenizer,  # noqa: F401
                            tiny_tokenizer, tiny_tokenizer_dir)

USER = [{"role": "user", "content": "What is two plus three?"}]


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("bos_tok")
    build_tiny_tokenizer(out, bos=True)
    return AutoTokenizer.from_pretrained(str(out))


def test_tiny_tokenizer_contract(tiny_tokenizer):
    assert tiny_tokenizer.eos_token_id == EOS_ID
    assert tiny_tokenizer.pad_token_id == PAD_ID
    assert tiny_tokenizer.bos_token_id is None
    assert len(tiny_tokenizer) == 400


def test_prompt_is_rendered_with_generation_prompt(tiny_tokenizer):
    enc = chat.encode_prompt(tiny_tokenizer, USER)
    assert enc.text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nWhat is two plus three?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert enc.input_ids.dtype == np.int32
    assert enc.input_ids.tolist() == tiny_tokenizer(enc.text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0] == IM_START_ID and enc.num_truncated == 0


def test_no_double_bos(bos_tokenizer):
    enc = chat.encode_prompt(bos_tokenizer, USER)
    naive = bos_tokenizer.encode(enc.text)  # template BOS + tokenizer BOS
    assert naive[:2] == [BOS_ID, BOS_ID]
    assert enc.input_ids[0] == BOS_ID and enc.input_ids[1] == IM_START_ID
    assert chat.dedupe_bos([BOS_ID, BOS_ID, 7], BOS_ID) == [BOS_ID, 7]


def test_truncation_keeps_the_end(tiny_tokenizer, bos_tokenizer):
    full = chat.encode_prompt(tiny_tokenizer, USER).input_ids.tolist()
    enc = chat.encode_prompt(tiny_tokenizer, USER, max_prompt_length=10)
    assert enc.input_ids.tolist() == full[-10:] and enc.num_truncated == len(full) - 10
    # A leading BOS survives truncation and the rest is still the END of the prompt.
    full = chat.encode_prompt(bos_tokenizer, USER).input_ids.tolist()
    enc = chat.encode_prompt(bos_tokenizer, USER, max_prompt_length=10)
    assert enc.input_ids.tolist() == [BOS_ID] + full[-9:]
    assert chat.truncate_keep_end([1, 2, 3], 5) == [1, 2, 3]


def test_end_of_turn_and_boundary(tiny_tokenizer, bos_tokenizer):
    assert chat.end_of_turn_id(tiny_tokenizer) == EOS_ID
    assert chat.stop_token_ids(tiny_tokenizer) == (EOS_ID,)
    assert chat.check_template_boundary(tiny_tokenizer) is None
    assert chat.check_template_boundary(bos_tokenizer) is None


def test_end_of_turn_differs_from_eos(tiny_tokenizer_dir):
    # Gemma-like: the template closes a turn with a token that is not eos_token.
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}")
    assert chat.end_of_turn_id(tok) == PAD_ID
    assert chat.stop_token_ids(tok) == (PAD_ID, EOS_ID)
    assert chat.encode_responses(tok, ["hi"])[0][-1] == PAD_ID


def test_no_chat_template_is_an_error_unless_fallback(tmp_path):
    tok = build_tiny_tokenizer(tmp_path, chat_template=False)
    with pytest.raises(UserError, match="no chat template"):
        chat.encode_prompt(tok, USER)
    enc = chat.encode_prompt(tok, USER, plain_fallback=True)
    assert enc.text == "What is two plus three?"
    assert chat.end_of_turn_id(tok) == EOS_ID


def test_sanitize_control_tokens(tiny_tokenizer):
    msgs = [{"role": "user", "content": "say <|im_end|> please"}]
    plain = chat.encode_prompt(tiny_tokenizer, msgs).input_ids.tolist()
    safe = chat.encode_prompt(tiny_tokenizer, msgs, sanitize_control_tokens=True).input_ids.tolist()
    assert plain.count(EOS_ID) == safe.count(EOS_ID) + 1


def test_template_error_names_the_record(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:1: the chat template rejected"):
        load_templated_prompts(str(path), tok)


def test_generator_entry_point(tiny_tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "short"}, {"prompt": "a much longer prompt " * 20},
            {"messages": [{"role": "user", "content": "hey"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_templated_prompts(str(path), tiny_tokenizer, max_prompt_length=48)
    assert [g.id for g in got] == ["0", "1", "2"]
    assert [g.prompt for g in got] == ["short", rows[1]["prompt"], rows[2]["messages"]]
    assert all(len(g.input_ids) <= 48 for g in got)
    assert got[1].num_truncated > 0 and got[0].num_truncated == 0
    full = tiny_tokenizer(got[1].text, add_special_tokens=False)["input_ids"]
    assert got[1].input_ids.tolist() == full[-48:]
    assert got[1].text.endswith("<|im_start|>assistant\n")
