"""`exp=superglue` runs the released GLM-Large finetuning settings, and docs/fidelity.md says so.

`ROWS` and `LOSS` re-state the official task scripts (`config_tasks/task_<task>.sh`, launched by
`scripts/finetune_superglue.sh`; argparse defaults of `arguments.py` where a script passes nothing).
Every task script sets lr 1e-5, linear decay, warm-up 0.1 and weight decay 0.1.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from omegaconf import DictConfig

from experiments.config import load_config
from experiments.jobs.superglue import main_metric
from glm_lightning.config import task_pattern_id
from glm_lightning.optim import annealing_factor

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"

# row of docs/fidelity.md: task, WSC mode, pattern, max length, global batch, epochs, eval interval
ROWS = {
    "ReCoRD": ("ReCoRD", "candidates", 0, 512, 64, 5, 1000),
    "COPA": ("COPA", "candidates", 0, 256, 16, 50, 1000),
    "WSC (candidates)": ("WSC", "candidates", 2, 128, 16, 50, 1000),
    "WSC (generative)": ("WSC", "generative", 0, 128, 16, 50, 1000),
    "RTE": ("RTE", "candidates", 0, 256, 16, 50, 10000000),
    "BoolQ": ("BoolQ", "candidates", 4, 256, 16, 20, 10000000),
    "WiC": ("WiC", "candidates", 1, 256, 16, 30, 10000000),
    "CB": ("CB", "candidates", 3, 256, 16, 50, 1000),
    "MultiRC": ("MultiRC", "candidates", 0, 512, 64, 15, 10000000),
}
# task_wsc.sh: --loss-func mix --length-penalty 1; the generative path trains the LM loss, scores nothing
LOSS = {"WSC (candidates)": ("mix", 1), "WSC (generative)": ("token-CE", None)}
SHARED = dict(lr=1e-5, warmup=0.1, decay="linear", weight_decay=0.1)
DEFAULTS = dict(loss="cross_entropy", length_penalty=0)  # arguments.py: --loss-func, --length-penalty
COLUMNS = ("task", "source", "pattern", "max length", "global batch", "epochs", "lr", "warm-up", "decay",
           "weight decay", "loss", "length penalty", "in-epoch eval", "best epoch")


@cache
def superglue_config() -> DictConfig:
    return load_config("superglue")


def released(name: str) -> dict:
    _, _, pattern, max_length, batch, epochs, eval_interval = ROWS[name]
    loss, length_penalty = LOSS.get(name, (DEFAULTS["loss"], DEFAULTS["length_penalty"]))
    return dict(pattern=pattern, max_length=max_length, batch=batch, epochs=epochs, **SHARED, loss=loss,
                length_penalty=length_penalty, eval_interval=eval_interval)


def project(name: str) -> dict:
    """The settings `exp=superglue` runs for one row of the table."""
    task, mode = ROWS[name][:2]
    cfg = superglue_config()
    tc, optim = cfg.superglue.tasks[task.lower()], cfg.optim
    generative = mode == "generative"
    return dict(pattern=task_pattern_id(tc, mode), max_length=tc.max_seq_length, batch=tc.batch_size,
                epochs=tc.epochs, lr=optim.lr, warmup=optim.warmup, decay=optim.lr_decay_style,
                weight_decay=optim.weight_decay, loss="token-CE" if generative else tc.loss_func,
                length_penalty=None if generative else tc.length_penalty)


def test_task_defaults_equal_the_released_scripts():
    for name in ROWS:
        expected = {k: v for k, v in released(name).items() if k != "eval_interval"}
        assert project(name) == expected, name
    cfg = superglue_config()
    optim = cfg.optim
    assert (optim.lr_decay_ratio, optim.lr_decay_iters, optim.clip_grad, cfg.seed) == (0.1, None, 1.0, 1234)
    assert (list(optim.betas), optim.eps, cfg.superglue.eval_batch_size) == ([0.9, 0.999], 1e-8, 16)


def test_an_explicit_wsc_pattern_applies_to_both_modes():
    tc = load_config("superglue", ["superglue.tasks.wsc.pattern_id=1"]).superglue.tasks.wsc
    assert task_pattern_id(tc, "candidates") == task_pattern_id(tc, "generative") == 1


def same(cell: str, value) -> bool:
    """A table cell (its first word) states ``value``: numbers compare as numbers, None is a dash."""
    word = cell.split()[0]
    if value is None:
        return word == "—"
    if isinstance(value, (int, float)):
        return float(word) == value
    return word == value


def settings_table() -> list[list[str]]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_fidelity_doc_lists_every_setting_with_both_values():
    rows = settings_table()
    assert [row[0] for row in rows[::2]] == list(ROWS) and all(row[0] == "" for row in rows[1::2])
    keys = ("pattern", "max_length", "batch", "epochs", "lr", "warmup", "decay", "weight_decay", "loss",
            "length_penalty")
    for doc_released, doc_project in zip(rows[::2], rows[1::2], strict=True):
        name = doc_released[0]
        values = released(name)
        assert all(same(cell, values[k]) for cell, k in zip(doc_released[2:12], keys, strict=True)), name
        assert same(doc_released[12], values["eval_interval"]), name
        assert doc_project[1] == "project" and doc_project[12] == "none"
        ours = project(name)
        assert all(same(cell, ours[k]) for cell, k in zip(doc_project[2:12], keys, strict=True)), name
        metric = main_metric(ROWS[name][0])
        assert doc_released[13] == doc_project[13] == metric, name


def test_warmup_above_half_and_the_decay_floor():
    """The released scheduler asserts warm-up <= 0.5 and lets the linear decay fall below its floor;
    here warm-up 0.6 runs (peak at 60 % of the run) and the lr stays at the floor afterwards."""
    load_config("superglue", ["optim.warmup=0.6"])  # accepted
    schedule = dict(decay_iters=10, warmup=0.6, style="linear", decay_ratio=0.1)
    factor = [annealing_factor(t, **schedule) for t in range(14)]
    assert factor[:7] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    assert factor[8] == pytest.approx(1 - 0.9 * 2 / 4)
    assert factor[10:] == pytest.approx([0.1] * 4)
