"""How every job ends when it is stopped (SIGTERM from a scheduler, or Ctrl-C): one handler for all.

The command line runs each job inside ``interruptible()``. Outside training a SIGTERM stops the job
at once; while a Trainer fits, the stop is left to Lightning, which ends the current step (and
``LastCheckpoint`` saves it). Either way the job raises ``RunInterrupted``, its MLflow runs end
KILLED (never FAILED, never left RUNNING) and ``experiments.run`` exits with 130 and one line.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from experiments.errors import RunInterrupted

INTERRUPTIONS = (RunInterrupted, SIGTERMException, KeyboardInterrupt)


def mlflow_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED when it was stopped on purpose, else FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, INTERRUPTIONS) else "FAILED"


def training_stopped(trainer: L.Trainer, checkpoint: Path, what: str = "") -> RunInterrupted:
    """The error a job raises after Lightning stopped its fit at a step boundary and saved ``checkpoint``."""
    return RunInterrupted(f"{what}interrupted at step {trainer.global_step}; checkpoint saved to "
                          f"{checkpoint}; continue with resume=auto")


class Interruption(L.Callback):
    """The job's SIGTERM handler, and the callback of every fitting Trainer that tells it a fit runs.

    Lightning runs its own SIGTERM handler first and then this one (it keeps a handler it finds
    installed). During a fit that handler stops training after the current step, so this one only
    stops what Lightning does not: start-up, evaluation, everything outside a Trainer.
    """

    def __init__(self) -> None:
        self._fitting: L.Trainer | None = None
        self.deferring = False  # inside ``stops_deferred``
        self.pending: int | None = None  # the signal that arrived meanwhile

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        state = self._fitting.state if self._fitting is not None else None
        if state is not None and state.fn == TrainerFn.FITTING and state.status == TrainerStatus.RUNNING:
            return
        if self.deferring:
            self.pending = signum
            return
        raise self.stop(signum)

    @staticmethod
    def stop(signum: int) -> RunInterrupted:
        return RunInterrupted(f"terminated by {signal.Signals(signum).name} outside a training step "
                              "(no checkpoint written now)")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._fitting = trainer

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, INTERRUPTIONS):  # the loggers end the run KILLED instead of FAILED
            for logger in trainer.loggers:
                if hasattr(logger, "mark_killed"):
                    logger.mark_killed()


_installed: Interruption | None = None


def interruption_callback() -> Interruption:
    """The callback for a fitting Trainer: the installed handler (an inert one outside ``interruptible``)."""
    return _installed or Interruption()


@contextmanager
def stops_deferred() -> Iterator[None]:
    """A stop that arrives inside the block is raised when the block ends. For writes to an MLflow
    sqlite store: a stop raised between a write and its commit leaves the store locked by this
    process, and ending the run KILLED then fails with "database is locked"."""
    handler = _installed
    if handler is None or handler.deferring:
        yield
        return
    handler.deferring = True
    try:
        yield
    finally:
        handler.deferring = False
    if handler.pending is not None:
        signum, handler.pending = handler.pending, None
        raise handler.stop(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Run the body with the job's SIGTERM handler installed (main thread only; restored after)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = Interruption()
    previous, _installed = signal.signal(signal.SIGTERM, handler), handler
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _installed = None
