"""Storage faults for the subprocesses of tests/test_fault_injection_storage.py.

Python imports this module at start-up when its folder is on PYTHONPATH. It changes nothing unless
one of these variables is set:

GLM_FAULT_ENOSPC_AFTER  files opened for writing whose path contains GLM_FAULT_ENOSPC_MATCH share a
                        budget of this many bytes (a disk filling up); a write beyond it raises
                        OSError(ENOSPC) as the kernel reports a full disk.
GLM_FAULT_EXDEV_DIR     os.rename / os.replace between this folder and any other fail with EXDEV,
                        as they do between two file systems (for machines with only one).
"""

from __future__ import annotations

import builtins
import errno
import io
import os

_ENOSPC_AFTER = os.environ.get("GLM_FAULT_ENOSPC_AFTER")
_ENOSPC_MATCH = os.environ.get("GLM_FAULT_ENOSPC_MATCH", ".ckpt")
_EXDEV_DIR = os.environ.get("GLM_FAULT_EXDEV_DIR")


class _FillingFile:
    """A writable file whose writes draw on the shared byte budget."""

    budget = [int(_ENOSPC_AFTER or 0)]

    def __init__(self, file: io.IOBase) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        size = len(data)
        if size > self.budget[0]:
            self._file.write(data[: self.budget[0]])
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= size
        return self._file.write(data)

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


if _ENOSPC_AFTER is not None:
    _open = builtins.open

    def _filling_open(file, mode="r", *args, **kwargs):
        opened = _open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wxa+")
        return _FillingFile(opened) if writing and _ENOSPC_MATCH in str(file) else opened

    builtins.open = io.open = _filling_open


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
