"""Reading JSON metadata files and quoting user values in error messages.

Data sources, model configs and checkpoint folders all read JSON written by other tools and
report what is wrong with it; these helpers sit below data/, models/ and hf/ so that each of
them can use them without importing the others.
"""
from __future__ import annotations

import json
import re
import reprlib
from typing import Any

from distillm2_jax.errors import UserError

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def show(value: Any) -> str:
    """A short repr of a value from the user's data for an error message (keeps it one short
    line even when the value is a megabyte string or a huge number)."""
    return _REPR.repr(value)


def first_line(err: Exception) -> str:
    """The first line of an exception's message (at most 300 characters), for a UserError."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


_BAD_BYTE = re.compile(r"[\udc80-\udcff]")      # an undecodable byte (surrogateescape)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape in JSON text


def open_text(path: str):
    """UTF-8 text whose invalid bytes become lone surrogates, so that reading never raises
    mid-file and `check_utf8` can name the line that holds them."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def check_utf8(text: str, where: str) -> None:
    """UserError naming `where` if text read through `open_text` had invalid UTF-8."""
    bad = _BAD_BYTE.search(text)
    if bad:
        start = text.rfind("\n", 0, bad.start()) + 1
        line = f"line {text.count(chr(10), 0, start) + 1} " if start else ""
        raise UserError(f"{where}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                        f"{line}column {bad.start() - start + 1})")


def parse_json(text: str, where: str) -> Any:
    """`json.loads` whose other failures also become a UserError naming `where`.

    json raises RecursionError for deep nesting (a few thousand brackets) and ValueError for
    integers past Python's 4300-digit limit; lone surrogate escapes ("\\ud800") parse but are
    not text any UTF-8 file can hold. Syntax errors stay `json.JSONDecodeError` so callers keep
    their messages.
    """
    check_utf8(text, where)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise UserError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:
        raise UserError(f"{where}: invalid JSON ({str(err)[:200]})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: invalid JSON (a \\u escape of a lone surrogate is "
                            "not Unicode text)") from None
    return obj


def read_json_file(path: str) -> Any:
    """A whole JSON file (metadata such as state.json or config.json); every failure is a
    UserError naming the file (and the line, for a syntax error)."""
    try:
        with open_text(path) as f:
            text = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return parse_json(text, path)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
