"""Trainer callbacks that keep a run from losing work when it is interrupted."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from glm_lightning.atomic import is_disk_full


class LastCheckpoint(Checkpoint):
    """The one writer of ``path`` (the run's ``last.ckpt``, which ``resume=auto`` picks up): after
    every validation, at ``max_steps``, when training ends, and when Ctrl-C or SIGTERM stop it
    after finishing the current step. Each step is written once.

    Pass it after the run's ModelCheckpoint (``save_last=False``): Lightning runs checkpoint
    callbacks last and in order, so ``last.ckpt`` written after a validation holds the best
    checkpoint that validation chose. Lightning already turns SIGTERM into a stop at the next batch
    boundary (``SIGTERMException``); a first Ctrl-C is routed the same way (a second one interrupts
    at once). The loggers are told an interrupted run was killed rather than failed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.interrupted = False
        self._previous_handler = None
        self._saved_step = -1  # global step of the latest checkpoint written by anyone
        self._written_step = -1  # global step that ``path`` holds, when written in this process

    @property
    def saved_step(self) -> int:
        """The global step of the latest checkpoint written in this process (-1: none yet)."""
        return self._saved_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if self._written_step == step:
            return
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # a full, resumable checkpoint
        except OSError as error:
            # A checkpoint of this very step was written (the best one, by ModelCheckpoint): nothing
            # is lost, so a full disk is a warning here, not a failed run.
            if not (is_disk_full(error) and self._saved_step == step):
                raise
            if rank_zero_only.rank == 0:
                print(f"warning: {self.path} not updated ({error.strerror}); step {step} is saved in "
                      "the run's other checkpoint of that step", file=sys.stderr)
        self._written_step = step

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
        # the epoch exactly where it stopped; after its validation when one follows.
        if 0 < trainer.max_steps <= trainer.global_step and not validation_follows(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
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


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (its own decision, read
    from its loop; False where that cannot be read, which only costs a second write)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop.val_loop.skip
    except AttributeError:
        return False


class StartStep(L.Callback):
    """The global step training started from in this process: 0, or a resumed checkpoint's step.
    Stays None when a resumed run had nothing left to train (Lightning then skips the loop)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step
