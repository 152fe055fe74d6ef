"""experiments.threads: torch computes with the cores that are free, unless told."""

from __future__ import annotations

import pytest

from experiments import threads
from experiments.config import ConfigError, load_config


def test_the_free_cores_are_used_at_least_one(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    for busy, expected in ((0.1, 2), (0.9, 1), (2.0, 1), (7.5, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda busy=busy: busy)
        assert threads.free_threads() == expected
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads, "busy_cores", lambda: 4.2)
    assert threads.free_threads() == 12 and threads.free_threads(processes=4) == 3


def test_a_setting_or_omp_num_threads_decides(monkeypatch):
    monkeypatch.setattr(threads, "free_threads", lambda processes=1: 7 // processes)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(load_config("quickstart", ["trainer.threads=3"])) == (3, "trainer.threads")
    cfg = load_config("quickstart", ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"])
    assert threads.choose_threads(cfg)[0] == 3  # two processes share the free cores
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose_threads(load_config("quickstart")) == (5, "OMP_NUM_THREADS")
    with pytest.raises(ConfigError, match="trainer.threads"):
        load_config("quickstart", ["trainer.threads=0"])


def test_busy_cores_reads_the_machine():
    assert 0.0 <= threads.busy_cores(0.05) <= threads.os.cpu_count()
