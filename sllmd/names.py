"""The one rule for model names, shared by the store and the wire.

A model name is also the name of its directory in the SSD store, so it may not
hold a path separator, a dot-dot, a leading dot or any control character
(a trailing newline included: the match is over the whole string).
"""
from __future__ import annotations

import re

from .errors import InvalidNameError

MAX_LEN = 128
_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,%d}" % (MAX_LEN - 1))
RULE = (f"1-{MAX_LEN} characters of letters, digits and . _ : + - "
        f"(starting with a letter or digit, no '..')")


def problem(name: object) -> str | None:
    """Why `name` is not a valid model name (None when it is)."""
    if not isinstance(name, str) or _RULE.fullmatch(name) is None or ".." in name:
        return f"must be {RULE}"
    return None


def is_valid(name: object) -> bool:
    return problem(name) is None


def check(name: object) -> str:
    """`name` if it is a valid model name, else InvalidNameError in one line."""
    why = problem(name)
    if why is not None:
        raise InvalidNameError(f"invalid model name {name!r}: {why}")
    return name  # type: ignore[return-value]
