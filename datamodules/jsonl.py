"""Reading jsonl files line by line, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def jsonl_records(path: str | Path, lines: Iterable[str], error: type[Exception], *,
                  first_line: int = 1) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of ``lines`` (read from ``path``, the
    first of them being line `first_line`); a line that is not JSON raises
    ``error("<path>:<line>: invalid JSON (...)")``."""
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
