"""A lock file per cache entry, so exactly one process (of any node sharing the cache) prepares it.

The lock is a file created with O_EXCL that names its holder (host, pid, time). While it is held, a
thread touches it every `heartbeat` seconds. A lock is stale, and is broken, when its holder was a
process of this host that no longer exists, or when it has not been touched for `stale_after`
seconds (a holder on another node that died). Breaking renames the lock aside first and puts it
back if it turns out to be a fresh one, so two waiters cannot both take over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from glm_lightning.atomic import process_alive

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0


class CacheLock:
    """An exclusive lock file; `try_acquire` never blocks."""

    def __init__(self, path: str | os.PathLike[str], *, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_SECONDS) -> None:
        self.path = Path(path)
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self._token = f"{uuid.uuid4().hex}"
        self._stop: threading.Event | None = None

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says about its holder (None when there is no lock)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now

    def describe(self) -> str:
        info = self.holder() or {}
        return f"process {info.get('pid', '?')} on {info.get('host', '?')}"

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; True when this process now holds it."""
        if self._stop is not None:
            return True
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale():
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                           "token": self._token}, f)
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), daemon=True).start()
            return True
        return False

    def acquire(self, poll_seconds: float = 0.1) -> CacheLock:
        """Wait until this process holds the lock (a stale one is taken over); returns self."""
        while not self.try_acquire():
            time.sleep(poll_seconds)
        return self

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if (self.holder() or {}).get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def is_stale(self) -> bool:
        info = self.holder()
        if info is None:
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            if not process_alive(info["pid"]):
                return True
        return age > self.stale_after

    def _break_if_stale(self) -> bool:
        """Remove a stale lock; True when the lock file is gone (the caller may try again)."""
        if not self.is_stale():
            return not self.path.exists()
        stale = self.holder()
        aside = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            if json.loads(aside.read_text()) != stale:  # a fresh lock taken meanwhile: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
        except (OSError, ValueError):
            pass
        finally:
            aside.unlink(missing_ok=True)
        return True

