"""This node's CurveZMQ key pair: made on first start, kept in the state directory.

    STATE_DIR/            mode 0700
      curve.secret        mode 0600: the z85 secret key (the public key is derived from it)
      curve.public        mode 0644: the z85 public key, for operators (`sllmctl nodes` shows it too)

Peers admit this node by its public key while it is a Serf member (its tags carry it), so the
secret is what proves "this node" on the peer socket: a secret file readable by group or
others is refused, as ssh refuses such a key. A damaged file is refused, never replaced (that
would silently change the node's identity); remove it to make a new pair.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq
from zmq.utils import z85

from sllmd.errors import ConfigError

SECRET_FILE = "curve.secret"
PUBLIC_FILE = "curve.public"
Z85_KEY_LEN = 40        # 32 bytes in z85


def _write(path: Path, text: str, mode: int) -> None:
    """Creates `path` with `mode` (never replacing a file), the whole text or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)      # fails if a concurrent start made one: theirs stays
    finally:
        tmp.unlink(missing_ok=True)


def _check_key(text: str, where: Path) -> bytes:
    key = text.strip().encode("ascii", "replace")
    if len(key) != Z85_KEY_LEN:
        raise ConfigError(f"curve key: {where} does not hold a z85 key ({len(key)} characters, expected "
                          f"{Z85_KEY_LEN}); remove it to make a new key pair")
    try:
        z85.decode(key)
    except Exception:
        raise ConfigError(f"curve key: {where} does not hold a z85 key; remove it to make a new key pair") from None
    return key


def load_or_create(state_dir) -> tuple[bytes, bytes]:
    """(public, secret), both z85 bytes; the pair is made on the first call."""
    if not zmq.has("curve"):
        raise ConfigError("curve key: this libzmq was built without CurveZMQ; the peer socket needs it")
    directory = Path(state_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            os.chmod(directory, 0o700)
    except OSError as e:
        raise ConfigError(f"curve key: cannot use the state directory {directory}: {e.strerror or e}") from None
    secret_path, public_path = directory / SECRET_FILE, directory / PUBLIC_FILE
    if not secret_path.exists():
        public, secret = zmq.curve_keypair()
        try:
            _write(secret_path, secret.decode(), 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(f"curve key: cannot write {secret_path}: {e.strerror or e}") from None
    try:
        st = os.stat(secret_path)
        text = secret_path.read_text()
    except OSError as e:
        raise ConfigError(f"curve key: cannot read {secret_path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"curve key: {secret_path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"curve key: {secret_path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"chmod 600 {secret_path}")
    secret = _check_key(text, secret_path)
    public = zmq.curve_public(secret)
    try:   # the public half, for operators; rewritten if missing or stale (it is derived, not trusted)
        if not public_path.exists() or public_path.read_text().strip().encode() != public:
            public_path.unlink(missing_ok=True)
            _write(public_path, public.decode(), 0o644)
    except OSError:
        pass
    return public, secret
