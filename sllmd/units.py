"""Sizes and durations as people write them: 8GiB, 512M, 1.5G; 5m, 30s, 1h30m, -1 (Ollama's keep_alive).

Shared by the daemon's config, the wire (keep_alive on a request) and sllmctl; a
bad value raises ConfigError with an example of a good one.
"""
from __future__ import annotations

import math
import re

from sllmd.errors import ConfigError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# --- sizes ---------------------------------------------------------------------------------
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?)(B?)\s*\Z", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(value: str | int) -> int:
    """Bytes from 8GiB, 512M, 1.5G, 100KB, 4096. K/M/G/T alone and KiB... are 1024-based, KB/MB/GB decimal."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"a size cannot be negative: {value}")
        return value
    if isinstance(value, float):
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"not a size: {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m and str(value).strip().startswith("-"):
        raise ConfigError(f"a size cannot be negative: {value!r}")
    if not m:
        raise ConfigError(f"not a size: {value!r} (examples: 8GiB, 512M, 4096)")
    number, unit, binary, suffix_b = m.groups()
    decimal = bool(suffix_b) and not binary and unit != ""
    base = 1000 if decimal else 1024
    return int(float(number) * base ** _POWERS[unit.upper()])


def parse_optional_size(value: str | int | None) -> int | None:
    """parse_size, or None for no limit ("none", "unlimited", "", None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "unlimited", "infinity")):
        return None
    return parse_size(value)


def format_size(n: int) -> str:
    """A size as parse_size reads it back: 4GiB, 2.93GiB, 512MiB, 100B (at most 3 significant digits)."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024 ** power:
            value = n / 1024 ** power
            text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
            return text + unit
    return f"{n}B"


# --- durations (Ollama's keep_alive grammar) -----------------------------------------------------
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _parse_go_duration(text: str) -> float | None:
    sign = 1.0
    if text and text[0] in "+-":
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[1:]
    if text == "0":
        return 0.0
    if not text:
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_duration(value: str | int | float) -> float:
    """Seconds from "5m", "30s", "1h30m", "-1", "300", 300, -1 (Ollama's keep_alive grammar).

    A number (or numeric string) is seconds; otherwise a Go duration. A negative
    result means forever; 0 means unload as soon as the request ends.
    """
    if isinstance(value, bool):
        raise ConfigError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ConfigError("not a duration: nan")
        return float(value)
    text = str(value).strip()
    seconds = _parse_go_duration(text)
    if seconds is None:
        try:
            seconds = float(text)
        except ValueError:
            raise ConfigError(f"not a duration: {value!r} (examples: 5m, 30s, 1h, -1, 300)") from None
        if math.isnan(seconds):
            raise ConfigError("not a duration: nan")
    return seconds
