"""`sllmctl run NAME`: an interactive chat with a model, as `ollama run` has it.

Each turn sends the whole conversation so far (the `messages` of an infer
request, which the daemon renders with the model's chat template) and streams
the answer. /bye or Ctrl-D leaves; Ctrl-C during an answer cancels that answer
(the daemon stops generating) and keeps the session; /clear forgets the
conversation; a message of several lines goes between triple double quotes.
With PROMPT given, it answers once and exits. --json prints each answer's
events (tokens, then done with its stats) as JSON lines. Lines read from a
pipe are turns too, so `printf 'hi\\n/bye\\n' | sllmctl run smol` works.
"""
from __future__ import annotations

import json
import sys
from typing import TextIO

from sllmd.client import Client

from .daemon_verbs import _client, add_sampling_options, already_loaded, read_prompt

QUOTE = '"""'
HELP = ("commands:\n"
        "  /bye      leave (Ctrl-D too)\n"
        "  /clear    forget the conversation so far\n"
        "  /?        this help\n"
        f"{QUOTE} starts a message of several lines, up to a line that ends with {QUOTE}.\n"
        "Ctrl-C stops the answer being written and keeps the session.")


class Chat:
    """One conversation with one model: the history, and one streamed answer per turn."""

    def __init__(self, client: Client, args, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.client, self.args, self.out, self.err = client, args, out, err
        self.history: list[dict[str, str]] = []
        if args.system:
            self.history.append({"role": "system", "content": args.system})

    def turn(self, text: str) -> bool:
        """Sends one user message and streams the answer; the turn joins the history only if the
        answer finished (a cancelled one is dropped). Returns whether it finished."""
        messages = [*self.history, {"role": "user", "content": text}]
        a = self.args
        pieces: list[str] = []
        stream = self.client.infer(a.name, messages=messages, max_tokens=a.max_tokens, temperature=a.temperature,
                                   top_p=a.top_p, seed=a.seed, stop=a.stop or None, keep_alive=a.keep_alive)
        try:
            with stream:
                for event in stream.events():
                    if event["type"] == "token":
                        pieces.append(event["text"])
                    if a.json:   # one JSON object per line, as `infer --json` prints them
                        self.out.write(json.dumps(event, default=str) + "\n")
                    elif event["type"] == "token":
                        self.out.write(event["text"])
                    self.out.flush()
        except KeyboardInterrupt:
            self._end_line(pieces)
            self.err.write("(answer cancelled)\n")
            self.err.flush()
            return False
        self._end_line(pieces)
        if a.stats and stream.stats is not None:
            self.err.write(json.dumps(stream.stats, default=str) + "\n")
        self.history = messages + [{"role": "assistant", "content": "".join(pieces)}]
        return True

    def _end_line(self, pieces: list[str]) -> None:
        if self.args.json:
            return
        if not pieces or not pieces[-1].endswith("\n"):
            self.out.write("\n")
        self.out.flush()


def _read_line(tty: bool, prompt: str = ">>> ") -> str | None:
    """The next input line, None at end of input."""
    if tty:
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _read_message(tty: bool) -> str | None:
    """The next message: one line, or the lines from one starting with three double quotes to
    one ending with them (as `ollama run` reads them); None at end of input."""
    line = _read_line(tty)
    if line is None or not line.lstrip().startswith(QUOTE):
        return line
    rest: str | None = line.lstrip()[len(QUOTE):]
    lines = []
    while rest is not None:
        if rest.rstrip().endswith(QUOTE):
            lines.append(rest.rstrip()[:-len(QUOTE)])
            break
        lines.append(rest)
        rest = _read_line(tty, "... ")
    return "\n".join(lines).strip("\n")


def cmd_run(args) -> int:
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with _client(args) as c:
        info = c.load(args.name, keep_alive=args.keep_alive)   # fails early for an unknown model
        chat = Chat(c, args)
        if args.prompt is not None:
            chat.turn(read_prompt(args.prompt))
            return 0
        if tty:
            state = "already loaded" if already_loaded(info) \
                else f"loaded from {info.get('load_tier', '?')} in {info.get('load_s', 0):.2f}s"
            sys.stderr.write(f"{args.name} {state}. Send a message (/? for help, /bye to leave).\n")
        while True:
            try:
                line = _read_message(tty)
            except KeyboardInterrupt:
                sys.stderr.write("\nUse Ctrl-D or /bye to leave.\n")
                continue
            if line is None:
                if tty:
                    sys.stderr.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/exit"):
                return 0
            if text == "/clear":
                chat.history = chat.history[:1] if args.system else []
                sys.stderr.write("(conversation cleared)\n")
                continue
            if text in ("/?", "/help"):
                sys.stderr.write(HELP + "\n")
                continue
            if text.startswith("/") and " " not in text:
                sys.stderr.write(f"unknown command {text} (/? for help)\n")
                continue
            try:
                chat.turn(line)
                if tty:
                    sys.stdout.write("\n")
            except KeyboardInterrupt:   # pressed just as the answer ended: the session stays
                sys.stderr.write("\nUse Ctrl-D or /bye to leave.\n")


def register(subparsers) -> None:
    text = "chat with NAME: multi-turn, streaming; /bye or Ctrl-D leaves, Ctrl-C stops an answer"
    p = subparsers.add_parser("run", help=text, description=text)
    p.add_argument("name")
    p.add_argument("prompt", nargs="?", help='answer this one prompt and exit ("-" reads it from stdin)')
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation (default: none; the chat template's own, if any)")
    add_sampling_options(p)
    p.add_argument("--stats", action="store_true", help="print each answer's stats as JSON on stderr")
    p.set_defaults(func=cmd_run)
