"""How training checkpoints are written (atomically) and told apart from broken ones (cheaply)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH

from glm_lightning.atomic import atomic_write
from glm_lightning.checkpoint import TokenizerRecord

DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint after every shard
ZIP_MAGIC = b"PK\x03\x04"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes each checkpoint with ``atomic_write``.

    Lightning's own save goes through fsspec, which writes a file in ``$TMPDIR`` and moves it; across
    file systems the move is a copy in place, so a kill left a truncated ``last.ckpt`` (and the
    temporary file). Here the checkpoint streams into a temporary file beside its target and is
    renamed when complete, which also avoids holding a second, serialized copy of it in memory.
    """

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options: object | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class RecordTokenizer(L.Callback):
    """Writes the run's ``TokenizerRecord`` into every checkpoint it saves, as top-level keys (a
    sharded save keeps them in its metadata file), so that loading with another tokenizer is refused."""

    def __init__(self, record: TokenizerRecord) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.record.store(checkpoint)


def checkpoint_metadata(path: str | Path) -> dict:
    """The top-level entries of a training checkpoint (a file, or a sharded folder's metadata file).
    Only the pickled part is read: the tensors of a file are memory-mapped, untouched."""
    path = Path(path)
    file = path / _METADATA_FILENAME if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def recorded_tokenizer(path: str | Path) -> TokenizerRecord | None:
    """The tokenizer a training checkpoint (a file, or a sharded folder) records, None if it has no record."""
    return TokenizerRecord.of(checkpoint_metadata(path))


def checkpoint_problem(path: str | Path, *, verify_content: bool = True) -> str | None:
    """Why ``path`` is not a loadable checkpoint (empty, truncated, damaged content, not a
    checkpoint), or None.

    A ``torch.save`` file is a zip archive whose central directory is written last, at its end, so
    reading that directory and checking that every member lies inside the file finds the empty and
    truncated files an interrupted write leaves, and files of another kind. ``torch.save`` also
    records a CRC-32 of every member (the pickle and each tensor's bytes), which ``torch.load``
    never checks: they are verified here, reading the file once at disk speed, so that a tensor
    overwritten inside an intact archive is refused before it is trained on. A sharded checkpoint
    is a folder that is complete once torch.distributed.checkpoint has written its ``.metadata`` file.
    ``verify_content=False`` skips the CRC-32s (for reading the checkpoint's pickled entries only).
    """
    path = Path(path)
    if path.is_dir():
        metadata = path / DCP_METADATA
        if not metadata.is_file() or metadata.stat().st_size == 0:
            return f"sharded checkpoint folder without its {DCP_METADATA} file (its write did not finish)"
        return None
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        with path.open("rb") as f:
            magic = f.read(len(ZIP_MAGIC))
        if magic != ZIP_MAGIC:
            return "not a PyTorch checkpoint (it is not a zip archive)"
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except FileNotFoundError:
        return "no such checkpoint"
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        return f"truncated or damaged ({size} bytes; its zip table of contents is unreadable: {error})"
    if not any(m.filename.endswith("/data.pkl") or m.filename == "data.pkl" for m in members):
        return "not a PyTorch checkpoint (a zip archive without data.pkl)"
    if any(m.header_offset + m.compress_size > size for m in members):
        return f"truncated ({size} bytes, shorter than its table of contents says)"
    return content_problem(path) if verify_content else None


def content_problem(path: Path) -> str | None:
    """Which member of the zip archive ``path`` fails its CRC-32, or None when all match."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"damaged (its contents are unreadable: {error})"
    if damaged is not None:
        return f"damaged content: {damaged} does not match its checksum (CRC-32)"
    return None


def newest_intact_checkpoint(directory: str | Path) -> tuple[Path | None, list[str]]:
    """The most recently written intact ``*.ckpt`` in ``directory`` (None if there is none) and,
    for each newer one that is broken, ``"<path> (<problem>)"``."""
    candidates = sorted(Path(directory).glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    skipped = []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, skipped
        skipped.append(f"{candidate} ({problem})")
    return None, skipped


def checkpoint_before(path: str | Path) -> Path | None:
    """The intact checkpoint beside ``path`` with the highest global step below that of ``path``
    (None if there is none): where to go back to when ``path`` turns out to be bad."""
    path = Path(path)
    step = checkpoint_metadata(path)["global_step"]
    earlier = []
    for candidate in path.parent.glob("*.ckpt"):
        if candidate != path and checkpoint_problem(candidate) is None:
            candidate_step = checkpoint_metadata(candidate).get("global_step", step)
            if candidate_step < step:
                earlier.append((candidate_step, candidate))
    return max(earlier)[1] if earlier else None
