"""Files that are either complete or absent, also on shared cluster disks.

A file is written under a temporary name in its own directory (never in ``$TMPDIR``, which may be
another file system: a rename across file systems is a copy that a kill interrupts halfway), flushed
and fsynced, renamed over the target with ``os.replace`` (atomic within one file system), and the
directory is fsynced so that the rename survives a crash of the machine. A failure removes the
temporary file. The temporary name holds the writer's host and pid, so a later write into the same
directory removes what a killed writer left behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ABANDONED_SECONDS = 120.0  # a temporary file of another host untouched this long is abandoned


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new name in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


# .<target name>~<random>~<pid>~<host>.tmp
_TEMPORARY = re.compile(r"^\.(?P<name>.+)~[0-9a-f]{8}~(?P<pid>\d+)~(?P<host>[^~/]+)\.tmp$")


def temporary_path(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``target`` that says who writes it."""
    target = Path(target)
    return target.with_name(f".{target.name}~{uuid.uuid4().hex[:8]}~{os.getpid()}~{socket.gethostname()}.tmp")


def remove_abandoned(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files in ``directory`` whose writer is gone: a dead process of this host,
    or one of another host untouched for ``ABANDONED_SECONDS``; returns the removed paths."""
    host, removed = socket.gethostname(), []
    for path in Path(directory).glob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        if match is None:
            continue
        try:
            if match["host"] == host:
                gone = not process_alive(int(match["pid"]))
            else:
                gone = time.time() - path.stat().st_mtime > ABANDONED_SECONDS
        except OSError:  # removed meanwhile
            continue
        if gone:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def publish(temporary: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename a complete, closed file over ``target`` durably (fsync file, rename, fsync directory)."""
    target = Path(target)
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temporary, target)
    fsync_directory(target.parent)
    return target


def atomic_write(target: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Create or replace ``target`` with what ``write(file)`` writes, all or nothing.

    A failure whose cause is an ``OSError`` without a file name (a full disk, seen by a writer that
    does not know the path; ``torch.save`` even reports it as a RuntimeError of its own) is raised
    as that ``OSError`` naming ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target.parent)
    temporary = temporary_path(target)
    try:
        with open(temporary, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = _os_error(error)
        if cause is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(target)) from error
        raise
    fsync_directory(target.parent)
    return target


def _os_error(error: BaseException | None) -> OSError | None:
    """The ``OSError`` with an errno that ``error`` is, or was raised while handling, if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """``Path.write_text(text)`` (UTF-8), all or nothing."""
    data = text.encode("utf-8")
    return atomic_write(target, lambda f: f.write(data))


def atomic_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """``shutil.copyfile(source, target)``, all or nothing."""
    def copy(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)
    return atomic_write(target, copy)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk or the user's quota is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
