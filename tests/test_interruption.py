"""The job's SIGTERM handler: a stop inside ``stops_deferred`` waits for the end of the block."""

from __future__ import annotations

import os
import signal

import pytest

from experiments.errors import RunInterrupted
from experiments.interruption import interruptible, stops_deferred


def test_a_stop_inside_a_deferred_block_is_raised_when_the_block_ends():
    written = []
    with interruptible():
        with pytest.raises(RunInterrupted, match="terminated by SIGTERM"):
            with stops_deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
                written.append("the write and its commit")
        with pytest.raises(RunInterrupted):  # outside the block a stop is raised at once
            os.kill(os.getpid(), signal.SIGTERM)
            written.append("not reached")
    assert written == ["the write and its commit"]
