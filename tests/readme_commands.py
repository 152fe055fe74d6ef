"""The commands of the README's bash blocks, and a server started from one of them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from timeouts import HANG_S

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_commands(markdown: str) -> list[str]:
    """Every command of the bash blocks (indented ones too), continuation lines joined, comments and
    the output lines the README shows after a command left out."""
    commands = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", markdown, flags=re.MULTILINE | re.DOTALL):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+#\s.*$", "", line))
    return commands


def readme_command(prefix: str) -> str:
    """The one README command that starts with ``prefix``."""
    found = [c for c in bash_commands(README.read_text(encoding="utf-8")) if c.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return found[0]


def argv(command: str) -> list[str]:
    return [sys.executable if arg == "python" else arg for arg in shlex.split(command)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], cwd: Path, port: int) -> Iterator[subprocess.Popen]:
    """A server started by ``command``, once it accepts connections on ``port``; stopped after."""
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
                time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=HANG_S)
