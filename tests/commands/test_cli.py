"""The CLI: help, the inspect command, and one-line user errors."""
import pytest

from distillm2_jax.cli import main
from tests.tiny_models import build_hf_model


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "inspect" in capsys.readouterr().out


def test_inspect_with_logit_check(tmp_path, capsys):
    build_hf_model("gemma2", tmp_path / "g", initializer_range=0.2)
    assert main(["inspect", str(tmp_path / "g"), "--check-logits"]) == 0
    out = capsys.readouterr().out
    assert "gemma2" in out and "final_softcap" in out
    err = float(out.split("max |diff| ")[1].split(",")[0])
    assert err < 1e-4


def test_user_error_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distillm2 inspect: error:") and "not a folder" in err and "\n" not in err
