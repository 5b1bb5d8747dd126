"""The `resstream` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`; this file only collects them and turns user errors into one line on
stderr with exit code 2 (no traceback)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands. Each defines register(subparsers) and sets a `func` default.
COMMAND_MODULES = (
    "resstream.duality",
    "resstream.bench",
    "resstream.generation",
    "resstream.operators_table",
    "resstream.train.commands",
    "resstream.compare.cli",
)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resstream", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"resstream {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # a run may say where it saved its checkpoint
        print(f"resstream {args.command}: {str(interrupt).strip() or 'interrupted'}",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
