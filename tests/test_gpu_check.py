"""benchmarks/gpu_check.py: the CPU smoke trains every row of the matrix that it can and declares the
others skipped, the peak used for MFU follows the device name, the global deadline skips or stops rows,
and the script imports only what the GPU machines have (torch, lightning, torchmetrics, sentencepiece,
numpy)."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
gpu_check = runpy.run_path(str(SCRIPT), run_name="gpu_check")

# Runs the script as `python benchmarks/gpu_check.py ARGS` does, and records the top-level package of
# every import statement that a file of this repository executes (at module level or later, e.g. the
# FSDP import inside configure_model), and sys.modules at the end.
RECORDING_RUN = """
import builtins, json, runpy, sys
record, ours, script = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3]
imported = set()
builtin_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and str((globals or {}).get("__file__")).startswith(ours):
        imported.add(name.partition(".")[0])
    return builtin_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording_import
sys.argv = sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open(record, "w") as f:
        json.dump({"imported": sorted(imported), "modules": sorted(sys.modules)}, f)
"""
OUR_CODE = ",".join(str(ROOT / folder) + os.sep for folder in ("benchmarks", "glm_lightning", "datamodules",
                                                                 "experiments"))
HANG_S = 3600  # only a hung run takes this long, however busy the machine
# what the GPU machines' Python has (their image lists these among many more, without our extras)
GPU_MACHINE_PACKAGES = {"torch", "lightning", "torchmetrics", "sentencepiece", "tokenizers", "numpy"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, dict]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    record = tmp / "imports.json"
    result = subprocess.run(
        [sys.executable, "-c", RECORDING_RUN, str(record), OUR_CODE, str(SCRIPT), "--smoke",
         "--out", str(tmp), "--budget-s", "inf"],  # no deadline: a busy machine must not stop a row
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=HANG_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    report = json.loads((tmp / "gpu_check.json").read_text())
    return report, (tmp / "gpu_check.md").read_text(), json.loads(record.read_text())


@pytest.mark.slow
def test_smoke_trains_every_row_it_can_and_skips_only_the_gpu_only_models(smoke) -> None:
    report, _, _ = smoke
    matrix, smoke_models = gpu_check["MATRIX"], gpu_check["SMOKE_MODELS"]
    assert [(r["precision"], r["attention"], r["compile"], r["strategy"]) for r in report["rows"]] == [
        (m.precision, m.attention, m.compile, m.strategy) for m in matrix]
    for row, planned in zip(report["rows"], matrix, strict=True):
        if planned.model not in smoke_models:
            assert (row["status"], row["model"]) == ("skipped", planned.model)
            assert row["note"] == f"{planned.model}: GPU only (the smoke trains tiny)"
            continue
        assert (row["status"], row["error"], row["model"], row["steps"]) == ("ok", None, "tiny", 50), row
        assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        assert row["loss_fell"] and row["last_loss"] < row["first_loss"] - 0.5, row
        assert row["tokens_per_s"] > 0 and row["mfu"] is None and row["peak_memory_gib"] is None
        if planned.attention == "flex":
            assert row["note"] == "trained with sdpa, flex compared in the forward pass"
            assert 0 < row["flex_vs_sdpa"] < 3e-2, row  # bf16 weights or autocast: a few bf16 ulps
        else:
            assert row["flex_vs_sdpa"] is None and row["note"] == ""
    assert {r["model"] for r in report["rows"]} == {"tiny", "glm-2b"}
    # Every row starts from the same weights on the same batch: the first losses differ by rounding only.
    first = [r["first_loss"] for r in report["rows"] if r["status"] == "ok"]
    assert max(first) - min(first) < 0.05, first


@pytest.mark.slow
def test_smoke_report_names_the_machine_the_peak_and_the_fp32_checks(smoke) -> None:
    report, markdown, _ = smoke
    assert report["device"].startswith("cpu") and report["smoke"] is True
    assert (report["torch"], report["lightning"]) == (torch.__version__, __import__("lightning").__version__)
    assert report["peak_tflops"] is None
    assert report["peak"] == f"unknown device {report['device']!r}: MFU n/a (give --peak-tflops)"
    assert report["settings"] == dict(cuda=False, seq_length=128, batch_size=8, steps=50, warmup_steps=10,
                                      lr=1e-3)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"flex == sdpa forward, padded blank-infilling batch",
                           "flex == sdpa forward, shared-context candidate mask", "flex == sdpa gradients"}
    for name in ("flex == sdpa forward, padded blank-infilling batch",
                 "flex == sdpa forward, shared-context candidate mask"):
        assert checks[name]["passed"] is True and checks[name]["relative_error"] < 1e-5
    assert checks["flex == sdpa gradients"]["passed"] is None
    assert checks["flex == sdpa gradients"]["note"] == "skipped: FlexAttention's backward pass needs CUDA"

    assert f"device {report['device']}; torch {torch.__version__}" in markdown
    assert f"peak {report['peak']}" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(report["rows"])
    for i, (line, row) in enumerate(zip(table, report["rows"], strict=True), 1):
        assert line.startswith(f"| {i} | {row['model']} | {row['precision']} | {row['attention']} |")
        assert f"| {row['status']} |" in line
        if row["status"] == "ok":
            assert f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} | yes |" in line


@pytest.mark.slow
def test_smoke_imports_nothing_the_gpu_machines_lack(smoke) -> None:
    _, _, imports = smoke
    ours = {"glm_lightning", "datamodules", "experiments"}
    third_party = set(imports["imported"]) - sys.stdlib_module_names - ours
    assert {"torch", "lightning", "numpy"} <= third_party <= GPU_MACHINE_PACKAGES, third_party
    # Lightning and torchmetrics import omegaconf and transformers themselves where they are installed
    # (as here); on the GPU machines they are not, and nothing of ours asks for them. MLflow: nobody.
    assert "mlflow" not in imports["modules"]


@pytest.mark.parametrize(("device", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 NVL", None),
    ("NVIDIA L4", None),
])
def test_peak_follows_the_device_name(device: str, peak: float | None) -> None:
    value, text = gpu_check["peak_of"](device, None)
    assert value == peak
    if peak is None:
        assert text == f"unknown device {device!r}: MFU n/a (give --peak-tflops)"
    else:
        assert text.startswith(f"{peak:g} TFLOP/s (dense bf16 datasheet peak of")
    assert gpu_check["peak_of"](device, 500.0) == (500.0, "500 TFLOP/s (--peak-tflops)")


def smoke_settings(steps: int) -> object:
    return gpu_check["Settings"](cuda=False, seq_length=64, batch_size=2, steps=steps, warmup_steps=1,
                                 lr=1e-3)


def test_rows_do_not_start_when_the_deadline_is_near() -> None:
    row = gpu_check["MATRIX"][0]
    result = gpu_check["run_row"](row, smoke_settings(3), [], time.monotonic() + 30, 60.0, None)
    assert (result["status"], result["note"]) == ("skipped", "not started: the global deadline is near")
    assert "seconds" not in result and "first_loss" not in result


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_a_row_at_the_deadline_stops_after_its_current_step() -> None:
    settings = smoke_settings(5)
    batches = gpu_check["micro_batches"](settings, 1024)
    result = gpu_check["train_row"](gpu_check["MATRIX"][0], "tiny", settings, batches, time.monotonic(), None)
    assert (result["status"], result["steps"]) == ("stopped", 1), result
    assert result["note"] == "stopped at the deadline after step 1"
    assert result["tokens_per_s"] is None and math.isfinite(result["first_loss"])
