"""Storage faults for the subprocesses of tests/test_fault_injection_storage.py.

Python imports this module at start-up when its folder is on PYTHONPATH. It changes nothing unless
one of these variables is set:

GLM_FAULT_ENOSPC_AFTER  files opened for writing in the folders GLM_FAULT_ENOSPC_DIRS (separated
                        by os.pathsep; they stand for one disk) share a budget of this many bytes
                        (the disk filling up); a write beyond it (also
                        one by os.sendfile, which shutil's copies use) raises OSError(ENOSPC) as
                        the kernel reports a full disk.
GLM_FAULT_EXDEV_DIR     os.rename / os.replace between this folder and any other fail with EXDEV,
                        as they do between two file systems (for machines with only one).
"""

from __future__ import annotations

import builtins
import errno
import io
import os

_ENOSPC_AFTER = os.environ.get("GLM_FAULT_ENOSPC_AFTER")
_ENOSPC_DIRS = tuple(os.path.realpath(d) + os.sep
                     for d in os.environ.get("GLM_FAULT_ENOSPC_DIRS", "").split(os.pathsep) if d)
_EXDEV_DIR = os.environ.get("GLM_FAULT_EXDEV_DIR")


class _FillingFile:
    """A writable file whose writes draw on the shared byte budget."""

    budget = [int(_ENOSPC_AFTER or 0)]
    descriptors: set[int] = set()

    def __init__(self, file: io.IOBase) -> None:
        self._file = file
        self.descriptors.add(file.fileno())

    @classmethod
    def spend(cls, size: int) -> int:
        """How much of ``size`` bytes still fits; raises ENOSPC when nothing does."""
        if cls.budget[0] == 0 and size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fits = min(size, cls.budget[0])
        cls.budget[0] -= fits
        return fits

    def write(self, data: bytes) -> int:
        fits = self.spend(len(data))
        self._file.write(data[:fits])
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.descriptors.discard(self._file.fileno())
        self._file.close()


if _ENOSPC_AFTER is not None:
    _open = builtins.open

    def _filling_open(file, mode="r", *args, **kwargs):
        opened = _open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wxa+")
        on_disk = isinstance(file, (str, os.PathLike)) and os.path.realpath(file).startswith(_ENOSPC_DIRS)
        return _FillingFile(opened) if writing and on_disk else opened

    _sendfile = os.sendfile

    def _filling_sendfile(out_fd, in_fd, offset, count):
        if out_fd in _FillingFile.descriptors:
            count = _FillingFile.spend(count)
        return _sendfile(out_fd, in_fd, offset, count)

    builtins.open = io.open = _filling_open
    os.sendfile = _filling_sendfile


if _EXDEV_DIR is not None:
    _inside = os.path.realpath(_EXDEV_DIR) + os.sep

    def _cross_device(name: str):
        original = getattr(os, name)

        def rename(src, dst, *args, **kwargs):
            sides = {os.path.realpath(os.fspath(p)).startswith(_inside) for p in (src, dst)}
            if len(sides) == 2:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
            return original(src, dst, *args, **kwargs)

        return rename

    os.rename, os.replace = _cross_device("rename"), _cross_device("replace")
