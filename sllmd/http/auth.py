"""--api-key-file: requests to /v1 need `Authorization: Bearer KEY`.

The key is the file's first line (surrounding blanks dropped). Whoever reads
the file can use the API, so a key file readable by group or others is refused
at start, as the cluster key is (sllmd.cluster.cluster_key) and ssh refuses a
private key.
"""
from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from sllmd.errors import ConfigError, UnauthorizedError

MIN_KEY_CHARS = 8


def load_api_key(path) -> str:
    """The key in `path`; ConfigError if the file is readable by others, empty or too short."""
    path = Path(path)
    try:
        st = os.stat(path)
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"api key: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"api key: {path} has mode {mode:04o}; it must not be readable by group or others "
                          f"(chmod 600 {path})")
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or not c.isprintable() for c in key):
        raise ConfigError(f"api key: {path} must hold one key of at least {MIN_KEY_CHARS} printable characters "
                          "without blanks on its first line (e.g. `openssl rand -hex 32 > FILE`)")
    return key


def check_bearer(header: str | None, key: str) -> None:
    """Raises UnauthorizedError unless `header` is `Bearer KEY` (compared in constant time)."""
    if not header:
        raise UnauthorizedError("this server needs an API key: send `Authorization: Bearer KEY`")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise UnauthorizedError("the Authorization header must be `Bearer KEY`")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise UnauthorizedError("the API key is not valid")
