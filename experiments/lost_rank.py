"""A rank lost mid-run (its node died, was killed or cut off): the others stop with one line naming it.

Every rank of a multi-process fit touches a heartbeat file in the shared run directory,
``<run>/.ranks/<rank>.json`` (rank, node, host, pid), every ``HEARTBEAT_S`` seconds. When a collective
fails (at once when a peer's connection drops, as gloo reports it, or after
``trainer.collective_timeout_s`` when the peer never answers), the failing rank watches those files
for ``STALE_S`` seconds: the ranks whose file does not move are the lost ones, and the job raises
``LostRank`` naming them. Staleness is judged by the change of each file's modification time,
never against this host's clock, so clock skew between nodes cannot fake or hide a loss.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import lightning as L

from experiments.errors import LostRank

HEARTBEAT_S = 1.0
STALE_S = 5.0  # no heartbeat for this long: the rank is gone


class RankWatch(L.Callback):
    """Heartbeats of this rank while a multi-process Trainer runs, and the lost ranks after a failure."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.lost: list[dict] = []
        self._stop: threading.Event | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or self._stop is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "node": trainer.node_rank,
                                    "host": socket.gethostname(), "pid": os.getpid()}))
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(path, self._stop), daemon=True).start()

    @staticmethod
    def _beat(path: Path, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:  # the shared disk hiccuped: the next beat tries again
                pass

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if trainer.world_size > 1 and isinstance(exception, Exception):
            self.lost = lost_ranks(self.folder, trainer.world_size, trainer.global_rank)

    def error(self, step: int, checkpoint: Path) -> LostRank:
        """The one-line error for the ranks found lost."""
        names = ", ".join(f"rank {r['rank']} (node {r['node']}, host {r['host']}, pid {r['pid']})"
                          for r in self.lost)
        return LostRank(f"lost {names}: no heartbeat for {STALE_S:g} s, so the collective of step {step + 1} "
                        f"failed; stopped; the last checkpoint is {checkpoint}; relaunch every node with "
                        "resume=auto to continue")


def lost_ranks(folder: Path, world_size: int, own_rank: int, window: float = STALE_S) -> list[dict]:
    """The ranks other than ``own_rank`` whose heartbeat file stays still (or is missing) for ``window``
    seconds, as their recorded (rank, node, host, pid); returns early once every other rank moved."""
    others = [rank for rank in range(world_size) if rank != own_rank]

    def stamp(rank: int) -> int | None:
        try:
            return (folder / f"{rank}.json").stat().st_mtime_ns
        except OSError:
            return None

    first = {rank: stamp(rank) for rank in others}
    still = set(others)
    deadline = time.monotonic() + window
    while still and time.monotonic() < deadline:
        time.sleep(HEARTBEAT_S / 4)
        still = {rank for rank in still if stamp(rank) is None or stamp(rank) == first[rank]}
    return [record(folder, rank) for rank in sorted(still)]


def record(folder: Path, rank: int) -> dict:
    """What rank ``rank`` wrote about itself, or just its number when it never wrote."""
    try:
        return json.loads((folder / f"{rank}.json").read_text())
    except (OSError, ValueError):
        return {"rank": rank, "node": "?", "host": "?", "pid": "?"}
