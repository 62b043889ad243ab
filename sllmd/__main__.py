"""`sllmd` / `python -m sllmd`: run the daemon in the foreground.

Settings: TOML config file < SLLMD_* environment < flags (see `sllmd --help`).
Logs go to stderr; under systemd (journal on stderr) each line carries its
syslog priority instead of a timestamp. Exit codes: 0 clean stop, 1 failure,
2 usage (an unknown flag), 78 bad configuration (one line on stderr, before
anything starts; the unit's RestartPreventExitStatus=78 relies on it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sllmd.config import (ConfigError, add_flags, as_dict, flags_from_args, load_config, prepare_socket_dir,
                          prepare_store_dir, value_flags)

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _stderr_is_journal(journal_stream: str | None) -> bool:
    if not journal_stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        dev, ino = journal_stream.split(":")
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (ValueError, OSError):
        return False


def setup_logging(level: str, journal_stream: str | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal(journal_stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sllmd", description="The sllm daemon: model tiers and inference "
                                     "for one host, served over a Unix socket.")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $SLLMD_CONFIG, "
                        "$CONFIGURATION_DIRECTORY/sllmd.toml, ~/.config/sllm/sllmd.toml)")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as JSON and exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    add_flags(parser)
    return parser


def join_dash_values(argv: list[str], flags: set[str]) -> list[str]:
    """`--dram -1GiB` as `--dram=-1GiB`: argparse takes a value starting with "-" for a flag
    (unless it is a plain negative number), which would turn a bad value into a usage error
    instead of the setting's own message, and refuse `--keep-alive -1m` outright."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(join_dash_values(argv, value_flags()))
    if args.version:
        from importlib.metadata import version
        from sllmd.protocol import PROTOCOL_VERSION
        sys.stdout.write(f"sllmd {version('sllmd')} (protocol {PROTOCOL_VERSION})\n")
        return 0
    try:
        config = load_config(flags_from_args(args), env=os.environ, config_file=args.config)
        if args.print_config:
            sys.stdout.write(json.dumps(as_dict(config), indent=2) + "\n")
            return 0
        prepare_store_dir(config)
        prepare_socket_dir(config)
    except ConfigError as e:
        sys.stderr.write("sllmd: " + " ".join(str(e).split()) + "\n")   # one line, whatever the cause
        return e.exit_code
    setup_logging(config.log_level, os.environ.get("JOURNAL_STREAM"))
    from sllmd.daemon import Daemon
    daemon = Daemon(config, env=os.environ)
    code = daemon.run()
    stragglers = daemon.stragglers()
    if stragglers:
        logging.getLogger("sllmd").warning("exiting with thread(s) still running: %s", ", ".join(stragglers))
    # Everything that holds state is closed and written. Interpreter teardown would only unload torch
    # (seconds on a busy host, counted against systemd's stop timeout) and, with a thread still inside
    # native code (a decode step), abort the process ("terminate called..."): skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
