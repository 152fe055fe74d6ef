"""Content hashes of corpus files, remembered by (size, mtime) so an unchanged file is not read again.

The tokenized-corpus cache is keyed by the sha256 of each file's bytes. Hashing a 20 GB file takes
about 15 s, so the digest is stored in ``<memo_dir>/<hash of the absolute path>.json`` together
with the file's size and modification time, and reused while both are unchanged. A file rewritten
with the same size within the file system's timestamp resolution keeps its old digest: pass
``rehash=True`` (config ``data.rehash=true``) to hash every file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes, read in one streaming pass."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_hash(path: str | os.PathLike[str], memo_dir: str | os.PathLike[str] | None = None, *,
                 rehash: bool = False) -> str:
    """The sha256 of `path`'s bytes, taken from `memo_dir` while the file's size and mtime match."""
    path = Path(path)
    stat = path.stat()
    if memo_dir is None:
        return file_sha256(path)
    resolved = str(path.resolve())
    memo = Path(memo_dir) / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"
    signature = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if not rehash:
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in signature} == signature:
                return str(saved["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = file_sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".memo.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**signature, "sha256": digest}, f)
        os.replace(tmp, memo)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return digest
