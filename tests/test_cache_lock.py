"""datamodules.cache_lock: one holder at a time; a dead or silent holder's lock is broken."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from timeouts import HANG_S

from datamodules.cache_lock import CacheLock


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_one_holder_at_a_time(tmp_path: Path) -> None:
    first, second = CacheLock(tmp_path / "x.lock"), CacheLock(tmp_path / "x.lock")
    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder()["pid"] == os.getpid()
    assert second.describe().startswith(f"process {os.getpid()} on ")
    first.release()
    assert not (tmp_path / "x.lock").exists()
    assert second.try_acquire()
    second.release()


def test_the_holder_touches_its_lock(tmp_path: Path) -> None:
    lock = CacheLock(tmp_path / "x.lock", heartbeat=0.05)
    assert lock.try_acquire()
    os.utime(lock.path, (0, 0))
    deadline = time.monotonic() + HANG_S
    while lock.path.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the heartbeat thread runs when the machine lets it
    assert lock.path.stat().st_mtime > 0
    lock.release()


def test_stale_locks_are_broken(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    # a process of this host that no longer exists: stale at once
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "time": 0}))
    lock = CacheLock(path)
    assert lock.try_acquire() and lock.holder()["pid"] == os.getpid()
    lock.release()
    # a holder on another node: stale only when it has not touched the lock for stale_after seconds
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "time": 0}))
    assert not CacheLock(path, stale_after=60).try_acquire()
    os.utime(path, (time.time() - 120, time.time() - 120))
    lock = CacheLock(path, stale_after=60)
    assert lock.try_acquire() and lock.holder()["host"] == socket.gethostname()
    lock.release()
    assert not list(tmp_path.iterdir())  # nothing left behind
