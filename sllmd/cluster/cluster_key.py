"""The cluster key: 32 random bytes, base64, in a file only its owner can read.

Serf encrypts gossip with it (`serf agent -encrypt`), so whoever reads it can join the
cluster: a key file readable by group or others is refused, as ssh refuses such a key.
"""
from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from sllmd.errors import ConfigError

KEY_BYTES = 32


def keygen(path) -> None:
    """Writes a new key to `path` (mode 0600); an existing file is never overwritten."""
    path = Path(path)
    text = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"cluster key: {path} exists; not overwriting it") from None
    except OSError as e:
        raise ConfigError(f"cluster key: cannot create {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)    # the umask may have taken bits away, never added any; be explicit
        f.write(text)


def load_cluster_key(path) -> str:
    """The base64 key in `path`; ConfigError if the file is readable by others or is not a key."""
    path = Path(path)
    try:
        st = os.stat(path)
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cluster key: cannot read {path}: {e.strerror or e}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"cluster key: {path} has mode {mode:04o}; it must not be readable by group or others "
                          f"(chmod 600 {path})")
    key = text.strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"cluster key: {path} does not hold a base64 key of {KEY_BYTES} bytes "
                          "(make one with: sllmctl keygen FILE)")
    return key
