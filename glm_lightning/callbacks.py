"""Trainer callbacks that keep a run from losing work when it is interrupted."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(L.Callback):
    """Keeps ``path`` (the run's ``last.ckpt``, which ``resume=auto`` picks up) current when
    training ends, and makes Ctrl-C or SIGTERM finish the current step, save it, then stop.

    ModelCheckpoint only saves at validation time, so a run reaching ``max_steps`` between two
    validations would otherwise lose its last steps. Lightning already turns SIGTERM into a stop at
    the next batch boundary (``SIGTERMException``); a first Ctrl-C is routed the same way (a second
    one interrupts at once). The loggers are told an interrupted run was killed rather than failed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.interrupted = False
        self._previous_handler = None
        self._saved_step = -1  # global step of the latest checkpoint written by anyone

    @property
    def saved_step(self) -> int:
        """The global step of the latest checkpoint written in this process (-1: none yet)."""
        return self._saved_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # a full, resumable checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, self._previous_handler or signal.default_int_handler)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(on_sigterm):  # no graceful path installed: interrupt as Python would
            raise KeyboardInterrupt
        on_sigterm(signal.SIGTERM, frame)  # Lightning's handler: stop at the end of this step

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # Save the final step from inside the epoch, so resuming with a larger max_steps continues
        # the epoch exactly where it stopped.
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return  # a crash: keep the last good checkpoint rather than saving a broken state
        self.interrupted = True
        self._save(trainer)
        for logger in trainer.loggers:
            if hasattr(logger, "mark_killed"):
                logger.mark_killed()


class StartStep(L.Callback):
    """The global step training started from in this process: 0, or a resumed checkpoint's step.
    Stays None when a resumed run had nothing left to train (Lightning then skips the loop)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
