"""Fetch the official SuperGLUE archive once into a cache and find its task folders.

The archive is streamed to a temporary file with a progress bar, its sha256 checked against the
expected digest (when one is configured) and extracted next to it; later runs reuse the folder.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from glm_lightning.config import ConfigError

CHUNK = 1 << 20
DONE_MARKER = ".extracted"


def download(url: str, path: Path, *, progress: bool = True) -> str:
    """Stream ``url`` to ``path`` (via a ``.part`` file, so a broken download leaves nothing that
    looks complete); returns the sha256 hex digest of the bytes."""
    digest = hashlib.sha256()
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    part.replace(path)
    return digest.hexdigest()


def find_data_dir(root: Path, tasks: tuple[str, ...] = ("RTE", "CB", "BoolQ", "COPA")) -> Path:
    """The folder below ``root`` (at most two levels down) that holds the task folders."""
    for folder in [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]:
        if folder.is_dir() and any((folder / task).is_dir() for task in tasks):
            return folder
    raise FileNotFoundError(f"{root}: the archive holds no SuperGLUE task folders ({', '.join(tasks)})")


def fetch_superglue(url: str, cache_dir: str | Path, sha256: str | None = None, *,
                    progress: bool = True) -> Path:
    """The SuperGLUE data folder from the archive at ``url``, downloaded and extracted under
    ``<cache_dir>/superglue`` on first use. A digest that differs from ``sha256`` is a ConfigError
    naming both, and the bad file is removed so the next run downloads again."""
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    root = Path(cache_dir) / "superglue" / key
    extracted = root / "data"
    if (extracted / DONE_MARKER).exists():
        return find_data_dir(extracted)
    archive = root / (Path(url.split("?")[0]).name or "superglue.zip")
    try:
        actual = download(url, archive, progress=progress)
    except OSError as error:
        raise ConfigError(f"cannot download 'superglue.url' {url}: {error}; set data.superglue_dir "
                          "to a local copy instead") from error
    if sha256 and actual != sha256.lower():
        archive.unlink()
        raise ConfigError(f"checksum mismatch for 'superglue.url' {url}: expected sha256 {sha256}, "
                          f"got {actual} (see 'superglue.sha256')")
    tmp = root / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():  # refuse members that would land outside the folder
            if not (tmp / name).resolve().is_relative_to(tmp.resolve()):
                raise ValueError(f"{archive}: unsafe member path {name!r}")
        zf.extractall(tmp)
    shutil.rmtree(extracted, ignore_errors=True)
    tmp.replace(extracted)
    (extracted / DONE_MARKER).write_text(actual + "\n")
    archive.unlink()
    return find_data_dir(extracted)
