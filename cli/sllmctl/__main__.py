"""sllmctl: the command-line front end of sllm.

Each verb lives in a module with `register(subparsers)`; a verb's handler takes
the parsed arguments and returns an exit code. Exit codes (DESIGN.md section 10):
0 ok, 1 error, 2 usage, 69 daemon unreachable, 75 busy/timeout.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sllmd.errors import Exit, SllmError

# Verb modules, in the order their verbs appear in --help.
VERB_MODULES = ["sllmctl.offline", "sllmctl.daemon_verbs"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllmctl", description="Drive sllm: checkpoints, models, inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail on stderr")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="sllmctl: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except SllmError as e:
        print(f"sllmctl: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("sllmctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
