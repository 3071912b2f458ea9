"""The `distillm2` command line: a thin layer over the Python API.

Each subcommand lives in `distillm2_jax.commands.<name>` and exposes
`register(subparsers)` (adds its parser and sets `func`) so commands stay small and
independent. User errors (`distillm2_jax.errors.UserError`) print one clear line and
exit with status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from distillm2_jax import __version__
from distillm2_jax.errors import UserError

# Subcommand modules under distillm2_jax.commands, in the order `--help` lists them.
COMMANDS: tuple[str, ...] = ("demo", "generate", "pair", "train", "eval", "judge", "eval_code", "export", "plot",
                             "inspect", "plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillm2",
        description="DistiLLM-2: contrastive distillation of LLMs in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"distillm2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"distillm2_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"distillm2 {args.command}: error: {err}", file=sys.stderr)
        from distillm2_jax import distributed

        distributed.exit_after_failure(f"distillm2 {args.command}: {err}", 2)
        return 2
    except KeyboardInterrupt:
        print(f"distillm2 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        from distillm2_jax import distributed

        if distributed.is_peer_failure(err):  # another process died mid-collective: one line, exit 1
            distributed.exit_after_peer_failure(err)
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
