"""The one way this package loads a tokenizer: from a local folder, never the hub, no remote code.

Every command, the trainer and the Python API go through `load_tokenizer`, so the safety policy
(local files only, `trust_remote_code=False`) and the error a user sees are the same everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

from distillm2_jax.errors import UserError
from distillm2_jax.jsonio import first_line, read_json_file

# Files whose malformed JSON is reported with its file and line rather than the library's message.
_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer saved in the folder `path`.

    Only local files are read and no code from the folder is run. Any failure raises one-line
    UserError naming the folder (or the malformed JSON file and its line).
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{os.fspath(path)}: not a folder (tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 (transformers / tokenizers raise many kinds for a bad file)
        for name in _JSON_FILES:
            if (folder / name).is_file():
                read_json_file(str(folder / name))
        raise UserError(f"{os.fspath(path)}: cannot load a tokenizer ({first_line(err)})") from None
