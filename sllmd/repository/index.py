"""A repository's index, and publishing a checkpoint into a repository directory.

    <repository>/
      index.json          {"format": "sllm-repository", "version": 1, "models": {NAME: entry}}
      .index.lock         flock()ed by publishers while they change index.json
      NAME/               one checkpoint in our format (DESIGN.md section 2) per model

    entry = {"path": "NAME", "size_bytes": N, "published_at": T, "model": {manifest's description},
             "files": [{"path": "manifest.json", "size": N, "sha256": HEX}, ...]}

Any plain web server over the directory serves it (nginx is the reference). Files are
listed with their SHA-256, the manifest's own scheme for its JSON files; the data files'
per-block CRC-32C values come from the manifest (itself checked against its SHA-256 here),
so a downloader verifies every block as it lands and every file at the end.

Publishing writes the checkpoint into a temporary directory inside the repository, renames
it into place and rewrites index.json (temporary file + rename) under an exclusive lock, so
concurrent publishers never lose each other's entries and a reader never sees a half index
or an entry whose files are not all there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import names
from ..errors import CheckpointError, ModelExistsError, RepositoryError
from ..store.format import MANIFEST_FILE, open_checkpoint
from ..store.writer import fsync_dir

FORMAT = "sllm-repository"
VERSION = 1
INDEX = "index.json"
LOCK = ".index.lock"


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the model's directory, '/'-separated (e.g. model/config.json)
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str  # the model's directory, relative to the repository root
    files: tuple[RemoteFile, ...]
    size_bytes: int
    published_at: float = 0.0
    model: dict | None = None

    def file(self, path: str) -> RemoteFile:
        for f in self.files:
            if f.path == path:
                return f
        raise RepositoryError(f"model {self.name!r}: the index lists no {path}")

    def to_json(self) -> dict:
        return {"path": self.path, "size_bytes": self.size_bytes, "published_at": self.published_at,
                "model": self.model or {}, "files": [f.to_json() for f in self.files]}


def _relative(value: Any, what: str) -> str:
    """A relative '/'-separated path of plain components (nothing can climb out of its directory)."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value or "\0" in value:
        raise ValueError(f"{what} must be a relative path, not {value!r:.80}")
    if any(part in ("", ".", "..") or part.startswith(".") for part in value.split("/")):
        raise ValueError(f"{what} {value!r:.80} has an empty, hidden or parent component")
    return value


def _size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, not {value!r:.60}")
    return value


def _entry(name: str, raw: Any) -> ModelEntry:
    if not names.is_valid(name):
        raise ValueError(f"{name!r:.80} is not a valid model name")
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        raise ValueError(f"model {name!r} must be an object with a files list")
    files = []
    for i, f in enumerate(raw["files"]):
        if not isinstance(f, dict):
            raise ValueError(f"model {name!r} file {i} is not an object")
        digest = f.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"model {name!r} file {i} needs a SHA-256 hex digest")
        files.append(RemoteFile(_relative(f.get("path"), f"model {name!r} file {i}"),
                                _size(f.get("size"), f"model {name!r} file {i} size"), digest))
    if MANIFEST_FILE not in {f.path for f in files}:
        raise ValueError(f"model {name!r} lists no {MANIFEST_FILE}")
    if len({f.path for f in files}) != len(files):
        raise ValueError(f"model {name!r} lists a file twice")
    published = raw.get("published_at", 0.0)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else None
    return ModelEntry(name, _relative(raw.get("path", name), f"model {name!r} path"), tuple(files),
                      sum(f.size for f in files), float(published) if isinstance(published, (int, float)) else 0.0,
                      model)


def parse_index(data: bytes, where: str) -> dict[str, ModelEntry]:
    """The models an index.json lists; anything malformed raises RepositoryError naming `where`."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f'it is not a repository index (no "format": "{FORMAT}")')
        if raw.get("version") != VERSION:
            raise ValueError(f"index version {raw.get('version')!r} is not supported (this sllm reads {VERSION})")
        models = raw.get("models")
        if not isinstance(models, dict):
            raise ValueError('"models" must be an object')
        return {name: _entry(name, entry) for name, entry in models.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError, TypeError) as e:
        raise RepositoryError(f"{where}: malformed repository index: {e}") from None


def index_bytes(models: dict[str, ModelEntry]) -> bytes:
    body = {"format": FORMAT, "version": VERSION,
            "models": {n: models[n].to_json() for n in sorted(models)}}
    return json.dumps(body, indent=1).encode()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def entry_for(checkpoint: Path, name: str, rel: str) -> ModelEntry:
    """The index entry of a checkpoint directory: every file with its size and SHA-256, the
    manifest first (a downloader needs its block checksums before the data)."""
    ckpt = open_checkpoint(checkpoint)
    paths = sorted((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: (p.name != MANIFEST_FILE, str(p)))
    files = tuple(RemoteFile(p.relative_to(checkpoint).as_posix(), p.stat().st_size, file_sha256(p)) for p in paths)
    return ModelEntry(name, rel, files, sum(f.size for f in files), time.time(), dict(ckpt.manifest.model))


def read_local_index(repo: Path) -> dict[str, ModelEntry]:
    try:
        return parse_index((repo / INDEX).read_bytes(), str(repo / INDEX))
    except FileNotFoundError:
        return {}


def is_repository(path: Path) -> bool:
    try:
        return json.loads((path / INDEX).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_index(repo: Path, models: dict[str, ModelEntry]) -> None:
    tmp = repo / f".{INDEX}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(index_bytes(models))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # a web server's user reads it
    os.replace(tmp, repo / INDEX)
    fsync_dir(repo)


def publish(source: str | os.PathLike, repo: str | os.PathLike, name: str, *, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None, dtype: str | None = None) -> ModelEntry:
    """Adds SOURCE (our checkpoint, or anything sllmd.store.convert reads) to the repository
    directory REPO as NAME, atomically; returns its index entry."""
    from ..store.convert import convert
    from ..tiers.importer import copy_checkpoint, is_our_checkpoint

    names.check(name)
    repo, src = Path(repo), Path(source).expanduser()
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    repo.mkdir(parents=True, exist_ok=True)
    if not overwrite and name in read_local_index(repo):
        raise ModelExistsError(f"{repo} already has a model named {name!r} (pass --overwrite to replace it)")
    work = repo / f".publish-{uuid.uuid4().hex[:12]}"
    staged = work / name
    work.mkdir()
    try:
        if is_our_checkpoint(src):
            open_checkpoint(src)  # a corrupt source is refused before anything is copied
            copy_checkpoint(src, staged, progress)
        else:
            convert(src, staged, dtype=dtype, progress=progress)
        for p in [staged, *staged.rglob("*")]:  # a web server running as another user reads them
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        entry = entry_for(staged, name, name)
        with open(repo / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one publisher at a time changes index.json
            models = read_local_index(repo)
            if name in models and not overwrite:
                raise ModelExistsError(f"{repo} already has a model named {name!r} (pass --overwrite to replace it)")
            dest = repo / name
            if dest.exists():  # the old version, or the leftover of a publisher that died before its index
                os.rename(dest, work / f"old-{name}")
            os.rename(staged, dest)
            fsync_dir(repo)
            models[name] = entry
            _write_index(repo, models)
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
