"""sllmctl: the command-line front end of sllm.

Each verb lives in a module with `register(subparsers)`; a verb's handler takes
the parsed arguments and returns an exit code. Exit codes (DESIGN.md section 10):
0 ok, 1 error, 2 usage, 69 daemon unreachable, 75 busy/timeout.

--socket, --timeout and --json go before or after the verb (`sllmctl --json ps`
and `sllmctl ps --json` are the same).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sllmd.__main__ import join_dash_values
from sllmd.client import DEFAULT_TIMEOUT
from sllmd.errors import Exit, SllmError

# Verb modules, in the order their verbs appear in --help.
VERB_MODULES = ["sllmctl.offline", "sllmctl.daemon_verbs", "sllmctl.chat", "sllmctl.cluster_verbs", "sllmctl.cluster_reads",
                "sllmctl.simulate", "sllmctl.metrics", "sllmctl.top", "sllmctl.watch", "sllmctl.publish"]
# Options that every verb takes and that may come before the verb as well.
GLOBAL_OPTIONS = ("socket", "timeout", "json")


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, unless it has none (None, False) or says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def add_global_options(parser: argparse.ArgumentParser, default=None) -> None:
    """--socket, --timeout and --json; on a verb's parser their default is SUPPRESS, so that a value
    given before the verb is not overwritten by the verb's default."""
    def d(value):
        return value if default is None else default
    parser.add_argument("--socket", metavar="PATH", default=d(None),
                        help="the daemon's socket (default: $SLLMD_SOCKET, else the per-user path, "
                             "else /run/sllmd/sllmd.sock)")
    parser.add_argument("--timeout", type=positive_seconds, metavar="S", default=d(DEFAULT_TIMEOUT),
                        help="give up after S seconds without a sign of life from the daemon "
                             f"(default: {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", default=d(False), help="print JSON")


def _version() -> str:
    from sllmd.protocol import PROTOCOL_VERSION
    try:
        from importlib.metadata import version
        number = version("sllmd")
    except Exception:
        number = "unknown"
    return f"sllmctl {number} (protocol {PROTOCOL_VERSION})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllmctl", description="Drive sllm: checkpoints, models, inference.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail on stderr")
    add_global_options(parser)
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
    for verb_parser in sub.choices.values():
        verb_parser.formatter_class = HelpFormatter
        given = {a.dest for a in verb_parser._actions}
        if "socket" not in given:
            add_global_options(verb_parser, default=argparse.SUPPRESS)
    return parser


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string, of the parser and its verbs, that takes a value."""
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb_parser in action.choices.values():
                flags |= value_options(verb_parser)
        elif action.option_strings and action.nargs != 0:
            flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--keep-alive -1m` as `--keep-alive=-1m` (argparse takes "-1m" for an option), as sllmd does.
    args = parser.parse_args(join_dash_values(argv, value_options(parser)))
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
