"""Who is asking, and may they read a path: the requester's credentials and a Unix permission check.

The daemon may run as another user than its clients (a system unit whose
socket is 0660 for a group). Whatever it reads on a client's behalf must be
readable by that client: `os.access` answers for the daemon's own user, so
`check_readable` evaluates the permission bits (and POSIX ACLs) of every
path component for the requester's uid and groups instead.

Credentials come from the kernel: libzmq reads SO_PEERCRED when an ipc
connection is accepted and appends ":uid:gid:pid" to the connection's
"Peer-Address" metadata, which every message received on that connection
carries (libzmq's stream engine, Linux). Supplementary groups are read from
the process's /proc status while its effective uid and gid still match.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from sllmd.errors import PermissionDeniedError

R, W, X = 4, 2, 1
MAX_TREE_ENTRIES = 100_000     # files and directories checked under one directory source

# POSIX.1e ACL as Linux stores it in the system.posix_acl_access xattr
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class Credentials:
    """A connected process's identity as the kernel reported it when it connected."""

    uid: int
    gid: int
    pid: int = 0
    groups: frozenset[int] | None = field(default=None, compare=False)   # None: look up on demand

    @classmethod
    def of_this_process(cls) -> "Credentials":
        return cls(os.geteuid(), os.getegid(), os.getpid(), frozenset(os.getgroups()) | {os.getegid()})

    def all_groups(self) -> frozenset[int]:
        """The primary gid plus supplementary groups (from /proc while the pid is still this process)."""
        if self.groups is not None:
            return self.groups | {self.gid}
        return frozenset(_proc_groups(self.pid, self.uid, self.gid)) | {self.gid}


def parse_peer_address(address: str | None) -> Credentials | None:
    """Credentials from libzmq's ipc "Peer-Address" ("host:uid:gid:pid"), or None (tcp, or none given)."""
    if not address:
        return None
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid, gid, pid = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    return Credentials(uid, gid, pid)


def _proc_groups(pid: int, uid: int, gid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = dict(line.split(":", 1) for line in f if ":" in line)
        euid, egid = int(lines["Uid"].split()[1]), int(lines["Gid"].split()[1])
        if (euid, egid) != (uid, gid):   # the pid now names another process: trust only the kernel's gid
            return set()
        return {int(g) for g in lines.get("Groups", "").split()}
    except (OSError, KeyError, ValueError, IndexError):
        return set()


# --- the permission check (pure) ----------------------------------------------------------------
def parse_acl(blob: bytes) -> list[tuple[int, int, int]] | None:
    """(tag, perm, id) entries of a system.posix_acl_access value, or None if it is not one."""
    if len(blob) < 4 or (len(blob) - 4) % 8 or struct.unpack_from("<I", blob)[0] != _ACL_VERSION:
        return None
    return [struct.unpack_from("<HHI", blob, off) for off in range(4, len(blob), 8)]


def may_access(mode: int, owner: int, group: int, uid: int, gids: frozenset[int] | set[int], want: int,
               acl: list[tuple[int, int, int]] | None = None) -> bool:
    """Whether a process with `uid` and groups `gids` gets `want` (R|W|X bits) on an inode.

    The kernel's order: root reads and searches anything; the owner gets the owner bits (only);
    then a named-user ACL entry (masked); then every matching group class entry (masked), any one
    granting; else the "other" bits. With no ACL the group class is the file's group bits."""
    if uid == 0:
        return not (want & X) or stat.S_ISDIR(mode) or bool(mode & 0o111)
    if uid == owner:
        return (mode >> 6) & want == want
    if not acl:
        if group in gids:
            return (mode >> 3) & want == want
        return mode & want == want
    mask = next((perm for tag, perm, _ in acl if tag == _MASK), 7)
    for tag, perm, who in acl:
        if tag == _USER and who == uid:
            return perm & mask & want == want
    matched = False
    for tag, perm, who in acl:
        if (tag == _GROUP_OBJ and group in gids) or (tag == _GROUP and who in gids):
            matched = True
            if perm & mask & want == want:
                return True
    if matched:
        return False
    return next((perm for tag, perm, _ in acl if tag == _OTHER), 0) & want == want


# --- the check on the file system ----------------------------------------------------------------
def _acl_of(path: str) -> list[tuple[int, int, int]] | None:
    try:
        return parse_acl(os.getxattr(path, _ACL_XATTR))
    except OSError:   # no ACL (ENODATA), or a file system without xattrs
        return None


def _allowed(path: str, st: os.stat_result, cred: Credentials, gids: frozenset[int], want: int) -> bool:
    acl = _acl_of(path) if cred.uid != 0 and cred.uid != st.st_uid else None
    return may_access(st.st_mode, st.st_uid, st.st_gid, cred.uid, gids, want, acl)


def _check_one(real: str, cred: Credentials, gids: frozenset[int], shown: str) -> os.stat_result | None:
    """Checks every ancestor of the resolved path `real` for search and the path itself for read
    (and search, for a directory). None if the path cannot be looked at (the reader reports that)."""
    parent = "/"
    try:
        for part in [p for p in real.split("/") if p]:
            if not _allowed(parent, os.stat(parent), cred, gids, X):
                raise PermissionDeniedError(f"{shown}: user {cred.uid} may not search {parent}")
            parent = os.path.join(parent, part)
        st = os.stat(real)
    except OSError:   # missing, or not even the daemon may look: the reader fails the same way
        return None
    want = R | X if stat.S_ISDIR(st.st_mode) else R
    if not _allowed(real, st, cred, gids, want):
        raise PermissionDeniedError(f"{shown}: user {cred.uid} may not read {real}")
    return st


def check_readable(path: str | os.PathLike, cred: Credentials | None) -> None:
    """Raises PermissionDeniedError unless `cred` may read `path` (every file and directory under
    it, for a directory), following symlinks as a reader would. A path that does not exist passes
    when every directory above it is searchable: the reader then reports it missing."""
    shown = os.fspath(path)
    if cred is None:
        raise PermissionDeniedError(f"{shown}: the daemon cannot tell which user is asking "
                                    "(no peer credentials on this connection)")
    gids = cred.all_groups()
    st = _check_one(os.path.realpath(path), cred, gids, shown)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return
    seen = 0
    for top, dirs, files in os.walk(os.path.realpath(path), followlinks=True):   # as rglob does
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_TREE_ENTRIES:
                raise PermissionDeniedError(f"{shown}: more than {MAX_TREE_ENTRIES} entries to check")
            entry = os.path.join(top, name)
            _check_one(os.path.realpath(entry), cred, gids, shown)
