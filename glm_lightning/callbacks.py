"""Trainer callbacks: keeping a run from losing work when it is interrupted, and its progress and
model summary as a person reads them (on a terminal or in a log file)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
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


class LineProgress(ProgressBar):
    """Training progress for a log file or a pipe: one line every ``every`` of the run's optimizer
    steps and one after each validation, instead of a bar redrawn many times a second (thousands of
    carriage-return updates in a file). ``progress_bar`` picks Lightning's bar on a terminal."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__()
        self.every = every
        self._enabled = True
        self._started = 0.0
        self._start_step = 0
        self._next_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total(self, trainer: L.Trainer) -> int:
        return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def _advance(self, trainer: L.Trainer) -> None:
        stride = max(1, round(self._total(trainer) * self.every))
        self._next_step = (trainer.global_step // stride + 1) * stride

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._start_step = time.monotonic(), trainer.global_step
        self._advance(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step, total = trainer.global_step, self._total(trainer)
        if step < self._next_step and step < total:
            return
        self._advance(trainer)
        if not (self._enabled and trainer.is_global_zero):
            return
        elapsed = time.monotonic() - self._started
        done = step - self._start_step
        left = f", about {elapsed / done * (total - step):.0f} s left" if 0 < done and step < total else ""
        loss = self.get_metrics(trainer, pl_module).get("train/loss")
        shown = f", train/loss {float(loss):.3f}" if loss is not None else ""
        print(f"step {step}/{total} ({step / total:.0%}), {elapsed:.0f} s{left}{shown}", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not (self._enabled and trainer.is_global_zero):
            return
        values = {key: float(value) for key, value in trainer.callback_metrics.items()
                  if key.startswith(("val/", "dev/")) and getattr(value, "numel", lambda: 1)() == 1}
        shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(values.items()))
        print(f"validation at step {trainer.global_step}: {shown or 'done'}", flush=True)


def progress_bar(stream: TextIO | None = None) -> ProgressBar:
    """Lightning's bar, redrawn in place, on a terminal; elsewhere (a file, a pipe, a cluster log)
    ``LineProgress``."""
    stream = sys.stdout if stream is None else stream
    return TQDMProgressBar() if stream.isatty() else LineProgress()


class SummaryWithoutFlops(ModelSummary):
    """Lightning's model summary without its FLOPs column and ``Total Flops`` line: Lightning can only
    count FLOPs with an example input, which our modules do not set, and prints 0. The real figure is
    logged while training (``ThroughputMonitor`` with ``glm_lightning.flops``)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                      total_training_modes, total_flops, *columns)
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + "\n".join(lines))
