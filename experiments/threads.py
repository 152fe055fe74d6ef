"""How many threads torch computes with: ``trainer.threads``, or the cores that are free now.

torch starts one thread per core. On a machine that other jobs keep busy those threads wait for
each other at every parallel operation, and a run becomes many times slower than with one thread
per free core; so unless told (``trainer.threads=N``, or ``OMP_NUM_THREADS`` in the environment),
a run measures how busy the cores it may use are and takes the free ones, at least one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

SAMPLE_SECONDS = 0.25  # how long the cores' busy time is watched


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or a cluster job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores of the machine other work kept busy over the last ``seconds`` (from
    /proc/stat; elsewhere the one-minute load average, which lags)."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return os.getloadavg()[0]

    def times() -> tuple[int, int]:
        fields = [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user nice system idle iowait irq softirq steal

    total0, idle0 = times()
    time.sleep(seconds)
    total1, idle1 = times()
    busy_share = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    return busy_share * (os.cpu_count() or 1)


def free_threads(processes: int = 1) -> int:
    """One thread per usable core that is not busy, shared by ``processes`` processes; at least one."""
    free = min(usable_cores(), round((os.cpu_count() or 1) - busy_cores()))
    return max(1, free // max(processes, 1))


def local_processes(cfg: DictConfig) -> int:
    """How many processes of this run share the machine's cores (CPU data parallelism)."""
    devices = cfg.trainer.devices
    on_cpu = cfg.trainer.accelerator == "cpu"
    return devices if on_cpu and isinstance(devices, int) and devices > 1 else 1


def choose_threads(cfg: DictConfig) -> tuple[int, str]:
    """The thread count of this run and where it came from, for the settings line."""
    if cfg.trainer.threads is not None:
        return cfg.trainer.threads, "trainer.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    threads = free_threads(local_processes(cfg))
    return threads, f"free of {usable_cores()} cores; set trainer.threads=N to choose"


@contextmanager
def torch_threads(cfg: DictConfig) -> Iterator[str]:
    """Compute with this run's thread count inside the block (the count before is restored after, for
    callers in a longer-lived process); yields the line that says so."""
    import torch

    previous = torch.get_num_threads()
    threads, source = choose_threads(cfg)
    torch.set_num_threads(threads)
    try:
        yield f"torch threads: {threads} ({source})"
    finally:
        torch.set_num_threads(previous)
