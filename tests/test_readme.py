"""The README's Python blocks run as written, in order, after a (shortened) quickstart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_are_found():
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and "latest_run" in blocks[0] and "fill_blanks" in blocks[1]


@pytest.mark.slow
def test_readme_python_blocks_run_after_the_quickstart(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quickstart = subprocess.run(
        [sys.executable, "-m", "experiments.run", "exp=quickstart", "trainer.max_steps=20",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "logging.enabled=false",
         f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("torch.Size([1, ") and "Arlen" in result.stdout  # logits, then the filled text
