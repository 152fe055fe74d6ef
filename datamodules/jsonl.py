"""Reading jsonl files line by line, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def jsonl_records(path: str | Path, lines: Iterable[str],
                  error: type[Exception]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of ``lines`` (read from ``path``);
    a line that is not JSON raises ``error("<path>:<line>: invalid JSON (...)")``."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
