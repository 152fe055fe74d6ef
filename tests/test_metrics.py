"""Tests for glm_lightning.metrics: hand-computed values, de-duplication by id, 2-process DDP."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timeouts import HANG_S
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from glm_lightning.metrics import (
    Accuracy,
    MacroF1,
    MultiRCExactMatch,
    MultiRCF1a,
    ReCoRDMetric,
    normalize_answer,
    superglue_metrics,
    table_row,
    token_f1,
)


def test_accuracy_counts_each_id_once():
    metric = Accuracy()
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 1]), ids=torch.tensor([0, 1]))
    assert metric.compute().item() == pytest.approx(0.5)
    metric.update(torch.tensor([0]), torch.tensor([1]), ids=[1])  # a DDP padding repeat of id 1
    assert metric.compute().item() == pytest.approx(0.5)  # 1/3 if it were counted twice


def test_cb_macro_f1_hand_computed():
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    metrics = superglue_metrics("CB")
    for metric in metrics.values():
        metric.update(preds, target, ids=torch.arange(6))
    # per class: F1(0) = 2*2/(2*2+0+1) = 0.8, F1(1) = 2/(2+1+1) = 0.5, F1(2) = 2/(2+1+0) = 2/3
    assert metrics["f1"].compute().item() == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["accuracy"].compute().item() == pytest.approx(4 / 6)


def test_macro_f1_leaves_out_classes_never_seen():
    metric = MacroF1(num_classes=3)
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), ids=torch.arange(3))
    assert metric.compute().item() == pytest.approx(1.0)  # class 2 absent: not a 0 in the mean


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_cb_macro_f1_match_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=generator))
    preds = torch.randint(0, 3, (n,), generator=generator)
    target = torch.randint(0, 3, (n,), generator=generator)
    ids = torch.randperm(1000, generator=generator)[:n]  # distinct ids, in any order
    metrics = superglue_metrics("CB")
    for metric in metrics.values():
        metric.update(preds[: n // 2], target[: n // 2], ids=ids[: n // 2])
        metric.update(preds[n // 2:], target[n // 2:], ids=ids[n // 2:])
    expected_acc = MulticlassAccuracy(num_classes=3, average="micro")(preds, target)
    expected_f1 = MulticlassF1Score(num_classes=3, average="macro")(preds, target)
    assert metrics["accuracy"].compute().item() == pytest.approx(expected_acc.item())
    assert metrics["f1"].compute().item() == pytest.approx(expected_f1.item())
    accuracy = Accuracy()
    accuracy.update(preds, target, ids=ids)
    assert accuracy.compute().item() == pytest.approx(expected_acc.item())


# Ids (paragraph, question, answer): question (0, 0) has 3 options, (0, 1) has 2, (1, 0) has 1.
MULTIRC_IDS = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 3], [0, 1, 4], [1, 0, 5]])
MULTIRC_TARGET = torch.tensor([1, 0, 1, 0, 0, 1])
MULTIRC_PREDS = torch.tensor([1, 0, 1, 1, 0, 0])


def test_multirc_f1a_and_em_grouping():
    f1a, em = MultiRCF1a(), MultiRCExactMatch()
    for metric in (f1a, em):
        metric.update(MULTIRC_PREDS, MULTIRC_TARGET, ids=MULTIRC_IDS)
    # tp = 2, fp = 1 (option 3), fn = 1 (option 5): F1 = 4 / 6
    assert f1a.compute().item() == pytest.approx(2 / 3)
    # only question (0, 0) has every option right
    assert em.compute().item() == pytest.approx(1 / 3)
    # a repeated row is dropped: otherwise fn = 2 and F1 = 4 / 7
    for metric in (f1a, em):
        metric.update(MULTIRC_PREDS[-1:], MULTIRC_TARGET[-1:], ids=MULTIRC_IDS[-1:])
    assert f1a.compute().item() == pytest.approx(2 / 3)
    assert em.compute().item() == pytest.approx(1 / 3)


def test_multirc_em_groups_by_paragraph_and_question():
    # the same question index in two paragraphs is two questions
    em = MultiRCExactMatch()
    em.update(torch.tensor([1, 0]), torch.tensor([1, 1]), ids=torch.tensor([[0, 0, 0], [1, 0, 0]]))
    assert em.compute().item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Cat's, hat!", "cats hat"),
        ("An apple a day", "apple day"),
        ("theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("the U.S.", "us"),
        ("  Barack\tObama\n", "barack obama"),
        ("A", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1():
    assert token_f1("the big cat", "a cat") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1("Obama", "Barack Obama") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)  # bags: common = 1, P = 1/2, R = 1


def test_record_max_over_golds_and_duplicates():
    metrics = superglue_metrics("ReCoRD")
    preds = ["Barack Obama", "the U.S."]
    golds = [["Obama", "President Barack Obama"], ["United States", "US"]]
    for metric in metrics.values():
        metric.update(preds, golds, ids=torch.tensor([[0, 0], [0, 1]]))
        metric.update(["wrong"], [["Obama"]], ids=torch.tensor([[0, 0]]))  # repeat of (0, 0): dropped
    # example 1: F1 max(2/3, 2*1*(2/3)/(1+2/3) = 0.8) = 0.8, EM 0; example 2: F1 1, EM 1
    assert metrics["f1"].compute().item() == pytest.approx((0.8 + 1.0) / 2)
    assert metrics["em"].compute().item() == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_record_metric_kind_and_empty():
    with pytest.raises(ValueError, match="kind"):
        ReCoRDMetric("acc")
    with pytest.raises(ValueError, match="before any update"):
        ReCoRDMetric("em").compute()


def test_superglue_metrics_names():
    assert set(superglue_metrics("CB")) == {"f1", "accuracy"}
    assert set(superglue_metrics("MultiRC")) == {"f1a", "em"}
    assert set(superglue_metrics("ReCoRD")) == {"f1", "em"}
    for task in ("BoolQ", "COPA", "RTE", "WiC", "WSC", "AX-b", "AX-g"):
        assert set(superglue_metrics(task)) == {"accuracy"}
    with pytest.raises(ValueError, match="unknown task"):
        superglue_metrics("SST-2")


def test_table_row_reproduces_glm_large():
    # GLM_Large row of Table 1 (the paper): average 77.0
    results = {
        "ReCoRD": {"f1": 81.7, "em": 81.1}, "COPA": {"accuracy": 76.0}, "WSC": {"accuracy": 81.7},
        "RTE": {"accuracy": 74.0}, "BoolQ": {"accuracy": 82.1}, "WiC": {"accuracy": 68.5},
        "CB": {"f1": 96.1, "accuracy": 94.6}, "MultiRC": {"f1a": 77.1, "em": 36.3, "accuracy": 99.0},
        "AX-b": {"accuracy": 0.0},  # diagnostics are not part of the average
    }
    row = table_row(results)
    assert row["ReCoRD"] == pytest.approx(81.4)
    assert row["CB"] == pytest.approx(95.35)
    assert row["MultiRC"] == pytest.approx(56.7)
    assert round(row["avg"], 1) == 77.0
    assert list(row) == ["ReCoRD", "COPA", "WSC", "RTE", "BoolQ", "WiC", "CB", "MultiRC", "avg"]
    with pytest.raises(KeyError, match="MultiRC"):
        table_row({"MultiRC": {"f1a": 1.0}})


# 2-process DDP: each rank sees half of the data plus a padding repeat; the synced result must equal
# the one-process result on the full data.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_data(rank: int) -> dict:
    """Rank r gets every other MultiRC row starting at r, and repeats its first row at the end (the
    DistributedSampler pads with repeats)."""
    rows = list(range(rank, len(MULTIRC_IDS), 2)) + [rank]
    return {
        "ids": MULTIRC_IDS[rows], "preds": MULTIRC_PREDS[rows], "target": MULTIRC_TARGET[rows],
        "record": (["Barack Obama", "the U.S.", "x"][rank::2], [["Obama"], ["US"], ["y"]][rank::2],
                   torch.tensor([[0, 0], [0, 1], [1, 0]])[rank::2]),
    }


def _all_metrics() -> dict:
    return {
        "cb": superglue_metrics("CB"), "multirc": superglue_metrics("MultiRC"),
        "record": superglue_metrics("ReCoRD"),
    }


def _update_and_compute(metrics: dict, data: dict) -> dict[str, float]:
    for group in ("cb", "multirc"):
        for metric in metrics[group].values():
            metric.update(data["preds"] % 3 if group == "cb" else data["preds"],
                          data["target"] % 3 if group == "cb" else data["target"], ids=data["ids"])
    for metric in metrics["record"].values():
        metric.update(*data["record"])
    return {f"{group}/{name}": metric.compute().item()
            for group, named in metrics.items() for name, metric in named.items()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=HANG_S))
    try:
        result = _update_and_compute(_all_metrics(), _rank_data(rank))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    full = {
        "ids": MULTIRC_IDS, "preds": MULTIRC_PREDS, "target": MULTIRC_TARGET,
        "record": (["Barack Obama", "the U.S.", "x"], [["Obama"], ["US"], ["y"]],
                   torch.tensor([[0, 0], [0, 1], [1, 0]])),
    }
    expected = _update_and_compute(_all_metrics(), full)

    context = mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP metric workers did not finish in time")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == pytest.approx(expected)
    # the padding repeats would change these if they were counted
    assert expected["multirc/f1a"] == pytest.approx(2 / 3)
    assert expected["multirc/em"] == pytest.approx(1 / 3)
