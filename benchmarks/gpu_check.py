"""GLM pretraining on one GPU, measured: tokens/s, MFU, peak memory and the loss, over a small matrix
of precision x attention x compile x strategy, in one run of at most 8 minutes on an H100.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT    # one GPU
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check      # CPU, tiny model

Every row trains the real pretraining path for 50 steps: a fresh ``GLMPretrainModule`` (seeded, so
every row starts from the same weights) on a Lightning ``Trainer`` with the row's precision plugin
and strategy (``fsdp`` is FSDP2 through ``glm_lightning.parallel``), on the same 50 micro-batches.
The batches are built once by ``BlankInfillingCollator`` (span objective) from 32 packed samples
of seq 512 (``[CLS] doc eos``) whose documents repeat short random token patterns: a span can be
filled from its context, so the loss must fall, and nothing is tokenized or downloaded. Attention
dropout is 0 in every row (FlexAttention has none); the other dropouts keep the presets' 0.1. The
optimiser is the module's (AdamW, lr 2e-4 as GLM-Large, 5 % warm-up, cosine decay over the 50 steps).

Per row: tokens/s over the steps after ``--warmup-steps`` (compilation happens there; the clock
starts and stops after a device synchronize; tokens are the collated B x L input tokens, as
``GLMPretrainModule`` counts them), MFU (model FLOPs of ``glm_lightning.flops`` per second over the
device's dense bf16 peak, or ``--peak-tflops``; n/a on an unknown device), peak memory
(``torch.cuda.max_memory_allocated``, reset per row), the first and last loss, whether the loss fell
(mean of the last 5 steps below the mean of the first 5), and a failed row's one-line error; the
next row runs regardless. Flex rows also compare flex with sdpa logits at the predicted positions
of one batch with the trained weights under the row's precision (max |flex - sdpa| / max |sdpa|).
Before the rows, fp32 checks compare flex with sdpa on a fresh model: the forward pass on a padded
blank-infilling batch and on the shared-context candidate mask, and (CUDA) the gradients.

The matrix (glm-large, batch 16) cannot hold every combination in 8 minutes; compiled rows cost
most (compilation). Rows run in the order of what they tell, so that a run cut short by the
deadline keeps the most informative ones:

1. the baseline (bf16-mixed, sdpa, eager, one device), against which every other row is read;
2. the expected best (bf16-mixed, flex, compiled: the recommended precision, bf16 compute over fp32
   master weights, which bf16-true would drop): with the baseline, the range of the answer;
3-6. one factor at a time from the baseline: flex, compiled, bf16-true, fsdp;
7. the best combination fsdp allows (it takes 32-true or bf16-mixed): the cost of FSDP2's hooks
   on one device, where it shards nothing;
8-9. glm-2b, expected best then baseline, only if time remains (and an out-of-memory is the row's
   error).

Deadline: rows start only while ``--row-reserve-s`` remain before ``--budget-s`` (counted from the
start); a row still training at the deadline stops after its current step ("stopped"), and rows not
started are recorded as "skipped". Results are written after every row.

``--smoke`` runs the same code on CPU with the tiny preset (seq 128, batch 8, lr 1e-3): bf16-mixed and
bf16-true, compiled layers, FSDP2 on one CPU process (gloo). FlexAttention has no backward pass on
CPU, so flex rows train with sdpa and compare the flex forward pass with sdpa; the glm-2b rows and
the gradient check are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from experiments.library_noise import quiet_libraries
from glm_lightning.attention_mask import candidate_attention_mask
from glm_lightning.blank_infilling import BlankInfillingCollator, SyntheticCommandIds
from glm_lightning.model import GLMConfig
from glm_lightning.modules.pretrain import GLMPretrainModule
from glm_lightning.parallel import build_strategy


@dataclass(frozen=True)
class Row:
    model: str
    precision: str
    attention: str  # sdpa | flex
    compile: bool
    strategy: str  # single | fsdp

    @property
    def name(self) -> str:
        return (f"{self.model} {self.precision} {self.attention} {'compiled' if self.compile else 'eager'} "
                f"{self.strategy}")


MATRIX = (
    Row("glm-large", "bf16-mixed", "sdpa", False, "single"),
    Row("glm-large", "bf16-mixed", "flex", True, "single"),
    Row("glm-large", "bf16-mixed", "flex", False, "single"),
    Row("glm-large", "bf16-mixed", "sdpa", True, "single"),
    Row("glm-large", "bf16-true", "sdpa", False, "single"),
    Row("glm-large", "bf16-mixed", "sdpa", False, "fsdp"),
    Row("glm-large", "bf16-mixed", "flex", True, "fsdp"),
    Row("glm-2b", "bf16-mixed", "flex", True, "single"),
    Row("glm-2b", "bf16-mixed", "sdpa", False, "single"),
)
SMOKE_MODELS = {"glm-large": "tiny"}  # the smoke's stand-ins; rows of other models are skipped there

# Dense bf16 tensor-core peaks (TFLOP/s, datasheet, no sparsity); the first name fragment found wins.
# "H100 80GB HBM3" is how torch names the SXM card.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0),
               ("A100", 312.0))


@dataclass(frozen=True)
class Settings:
    cuda: bool
    seq_length: int
    batch_size: int
    steps: int
    warmup_steps: int
    lr: float


FIRST_WORD = 10  # the first word id after SyntheticCommandIds
DOCUMENTS = 32


def model_config(name: str, settings: Settings, **fields) -> GLMConfig:
    overrides = {} if settings.cuda else dict(max_sequence_length=settings.seq_length)
    return GLMConfig.from_name(name, attention_dropout_prob=0.0, **overrides, **fields)


def documents(vocab_size: int, seq_length: int, seed: int = 0) -> list[np.ndarray]:
    """``DOCUMENTS`` packed samples of ``seq_length`` tokens, ``[CLS] doc eos``, each document a random
    pattern of 5-40 word ids repeated: learnable from context, different from sample to sample."""
    rng = np.random.default_rng(seed)
    ids = SyntheticCommandIds()
    samples = []
    for _ in range(DOCUMENTS):
        pattern = rng.integers(FIRST_WORD, vocab_size, rng.integers(5, 41))
        samples.append(np.concatenate(([ids.cls_id], np.resize(pattern, seq_length - 2), [ids.eos_id])))
    return samples


def micro_batches(settings: Settings, vocab_size: int) -> list[dict]:
    """The ``settings.steps`` micro-batches every row trains on, collated once."""
    samples = documents(vocab_size, settings.seq_length)
    collator = BlankInfillingCollator(SyntheticCommandIds(), seed=0)
    B = settings.batch_size
    return [collator([samples[(step * B + i) % len(samples)] for i in range(B)])
            for step in range(settings.steps)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def relative_error(value: Tensor, reference: Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def flex_vs_sdpa(model: torch.nn.Module, config: GLMConfig, batch: dict,
                 context: AbstractContextManager | None = None) -> float:
    """Relative max difference of flex and sdpa logits at the predicted positions, eval mode, in
    ``context`` (a precision plugin's forward context). The layers run eagerly (flex through its own
    compiled kernel on CUDA): compiled, the eval graphs would add a compilation to every row, and
    inductor's C++ FlexAttention kernel does not build on CPU (torch 2.13)."""
    trained, compiled, logits = config.attention, config.compile, {}
    config.compile = False
    model.eval()
    with torch.no_grad(), context or nullcontext():
        for backend in ("sdpa", "flex"):
            config.attention = backend
            logits[backend] = model(batch["input_ids"], batch["position_ids"], batch["sep"],
                                    output_mask=batch["loss_mask"].bool())
    config.attention, config.compile = trained, compiled
    return relative_error(logits["flex"], logits["sdpa"])


class StepClock(L.Callback):
    """Losses of every step; time, tokens and model FLOPs of the steps after the warm-up; peak memory
    and the flex check at the end of training (before teardown moves the model off the device)."""

    def __init__(self, warmup_steps: int, deadline: float, flex_check_batch: dict | None):
        self.warmup_steps, self.deadline, self.flex_check_batch = warmup_steps, deadline, flex_check_batch
        self.losses: list[Tensor] = []
        self.tokens = self.flops = 0.0
        self.start = self.seconds = None
        self.stopped = False
        self.peak_memory = self.flex_error = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        if batch_idx == self.warmup_steps:
            synchronize(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: GLMPretrainModule, outputs: dict,
                           batch: dict, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().float())
        if batch_idx >= self.warmup_steps:
            self.tokens += batch["input_ids"].numel()
            self.flops += module.flops_per_batch
        if time.monotonic() > self.deadline and batch_idx + 1 < trainer.max_steps:
            trainer.should_stop = self.stopped = True

    def on_train_end(self, trainer: L.Trainer, module: GLMPretrainModule) -> None:
        synchronize(module.device)
        if self.start is not None and len(self.losses) > self.warmup_steps:
            self.seconds = time.perf_counter() - self.start
        if module.device.type == "cuda":
            self.peak_memory = torch.cuda.max_memory_allocated(module.device) / 2**30
        if self.flex_check_batch is not None:
            batch = trainer.strategy.batch_to_device(self.flex_check_batch)
            self.flex_error = flex_vs_sdpa(module.model, module.model.config, batch,
                                           trainer.precision_plugin.forward_context())


def train_row(row: Row, model_name: str, settings: Settings, batches: list[dict], deadline: float,
              peak_tflops: float | None) -> dict:
    """Fit one row; its measurements (raises whatever the fit raises)."""
    # FlexAttention has no backward pass off CUDA: there flex rows train on sdpa and compare forwards.
    trained = row.attention if settings.cuda else "sdpa"
    L.seed_everything(0, verbose=False)
    config = model_config(model_name, settings, attention=trained, compile=row.compile)
    module = GLMPretrainModule(config, lr=settings.lr)
    clock = StepClock(settings.warmup_steps, deadline, batches[0] if row.attention == "flex" else None)
    accelerator = "gpu" if settings.cuda else "cpu"
    strategy = build_strategy("fsdp" if row.strategy == "fsdp" else "auto", accelerator=accelerator,
                              precision=row.precision)
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=row.precision,
                        max_steps=settings.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    if settings.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    losses = torch.stack(clock.losses).cpu().tolist()
    tokens_per_s = clock.tokens / clock.seconds if clock.seconds else None
    mfu = clock.flops / clock.seconds / (peak_tflops * 1e12) if clock.seconds and peak_tflops else None
    notes = ["trained with sdpa, flex compared in the forward pass"] if trained != row.attention else []
    if clock.stopped:
        notes.append(f"stopped at the deadline after step {len(losses)}")
    return dict(
        status="stopped" if clock.stopped else "ok", note="; ".join(notes),
        steps=len(losses), tokens_per_s=tokens_per_s, mfu=mfu, peak_memory_gib=clock.peak_memory,
        first_loss=losses[0], last_loss=losses[-1],
        loss_fell=bool(np.mean(losses[-5:]) < np.mean(losses[:5])), flex_vs_sdpa=clock.flex_error,
    )


def run_row(row: Row, settings: Settings, batches: list[dict], deadline: float, reserve_s: float,
            peak_tflops: float | None) -> dict:
    """One row as a result dict, whatever happens: skipped, error (one line) or measured."""
    model_name = row.model if settings.cuda else SMOKE_MODELS.get(row.model, row.model)
    ran = replace(row, model=model_name)
    result = dict(row=ran.name, **asdict(ran), status="skipped", error=None, note="")
    if not settings.cuda and row.model not in SMOKE_MODELS:
        result["note"] = f"{row.model}: GPU only (the smoke trains {', '.join(SMOKE_MODELS.values())})"
        return result
    if time.monotonic() + reserve_s > deadline:
        result["note"] = "not started: the global deadline is near"
        return result
    start = time.monotonic()
    try:
        result.update(train_row(row, model_name, settings, batches, deadline, peak_tflops))
    except Exception as error:  # one failing row must not stop the others
        result.update(status="error", error=one_line(error))
    finally:
        release()
    result["seconds"] = time.monotonic() - start
    return result


def release() -> None:
    """Leave nothing of a row to the next: process group, compiled graphs, device memory."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fp32_checks(settings: Settings, model_name: str, batch: dict) -> list[dict]:
    """flex against sdpa in fp32 on a fresh model: forward on the GLM mask of a padded batch and on
    the shared-context candidate mask; on CUDA also the gradients of the pretraining loss."""
    device = torch.device("cuda" if settings.cuda else "cpu")
    torch.manual_seed(0)
    module = GLMPretrainModule(model_config(model_name, settings, embedding_dropout_prob=0.0,
                                            output_dropout_prob=0.0, attention="sdpa")).to(device)
    model, config = module.model, module.model.config
    batch = {k: v[:4].to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    tolerance = 1e-3 if settings.cuda else 1e-5  # GPU kernels accumulate in other orders
    checks = []

    def check(name: str, error: float | None, skipped: str = "") -> None:
        passed = None if skipped else error < tolerance
        checks.append(dict(name=name, passed=passed, relative_error=error, tolerance=tolerance, note=skipped))
        verdict = "skip" if skipped else "ok  " if passed else "FAIL"
        print(f"{verdict} {name}: " + (skipped or f"relative error {error:.1e} (tolerance {tolerance:.0e})"),
              flush=True)

    check("flex == sdpa forward, padded blank-infilling batch", flex_vs_sdpa(model, config, batch))
    B, length = batch["input_ids"].shape
    sep = batch["sep"]
    candidates = torch.full((B, length), -1, device=device)
    part_b = torch.arange(length, device=device)[None] >= sep[:, None]
    candidates[part_b] = ((torch.arange(length, device=device)[None] - sep[:, None]) // 7)[part_b]
    mask = candidate_attention_mask(sep, candidates)  # candidates of 7 tokens after each Part A
    logits = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            config.attention = backend
            logits[backend] = model(batch["input_ids"], batch["position_ids"], attention_mask=mask)
    check("flex == sdpa forward, shared-context candidate mask",
          relative_error(logits["flex"], logits["sdpa"]))
    if not settings.cuda:
        check("flex == sdpa gradients", None, "skipped: FlexAttention's backward pass needs CUDA")
        return checks
    model.train()
    grads = {}
    for backend in ("sdpa", "flex"):
        config.attention = backend
        model.zero_grad()
        module.loss(batch)[0].backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    error = ((grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item()
    check("flex == sdpa gradients (relative L2 error)", error)
    return checks


def peak_of(device_name: str, override: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak in TFLOP/s and a sentence saying where it comes from."""
    if override is not None:
        return override, f"{override:g} TFLOP/s (--peak-tflops)"
    for fragment, peak in PEAK_TFLOPS:
        if fragment in device_name:
            return peak, f"{peak:g} TFLOP/s (dense bf16 datasheet peak of {fragment})"
    return None, f"unknown device {device_name!r}: MFU n/a (give --peak-tflops)"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "",
             f"device {report['device']}; torch {report['torch']}, lightning {report['lightning']}, "
             f"python {report['python']}; peak {report['peak']}", "",
             "settings: " + ", ".join(f"{k} {v}" for k, v in report["settings"].items()), ""]
    lines += [f"- {'skip' if c['passed'] is None else 'ok' if c['passed'] else 'FAIL'} {c['name']}: "
              + (c["note"] or f"relative error {c['relative_error']:.1e}") for c in report["checks"]]
    lines += ["", "| # | model | precision | attention | compile | strategy | status | tokens/s | MFU "
              "| peak mem (GiB) | loss first -> last | fell | flex vs sdpa | error / note |",
              "|---:|---|---|---|---|---|---|---:|---:|---:|---|---|---:|---|"]
    for i, r in enumerate(report["rows"], 1):
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "first_loss" in r else ""
        lines.append(
            f"| {i} | {r['model']} | {r['precision']} | {r['attention']} | {'yes' if r['compile'] else 'no'} "
            f"| {r['strategy']} | {r['status']} | {fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('peak_memory_gib'), '.1f')} | {loss} "
            f"| {'' if 'loss_fell' not in r else 'yes' if r['loss_fell'] else 'NO'} "
            f"| {fmt(r.get('flex_vs_sdpa'), '.1e') if r['attention'] == 'flex' else ''} "
            f"| {r['error'] or r['note']} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, the same code paths")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/gpu_check"),
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else "
                        "benchmarks/gpu_check)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, for MFU")
    parser.add_argument("--budget-s", type=float, default=360.0, help="global deadline from the start")
    parser.add_argument("--row-reserve-s", type=float, default=90.0,
                        help="no row starts with less time than this left before the deadline")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps at the start of a row")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: run with --smoke for the CPU version")
    if args.smoke:
        torch.set_num_threads(1)  # the tiny model's matmuls gain nothing from threads that spin on a busy CPU
    quiet_libraries()
    for logger in ("lightning.pytorch", "lightning.fabric"):  # the Trainer's per-fit info lines
        logging.getLogger(logger).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers")  # the batches are prebuilt
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")

    settings = Settings(cuda=cuda, seq_length=512 if cuda else 128, batch_size=16 if cuda else 8, steps=50,
                        warmup_steps=args.warmup_steps, lr=2e-4 if cuda else 1e-3)
    device_name = torch.cuda.get_device_name() if cuda else f"cpu {platform.machine()}"
    peak, peak_text = peak_of(device_name, args.peak_tflops)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    report = dict(device=device_name, torch=torch.__version__, lightning=L.__version__,
                  python=platform.python_version(), date=date, smoke=args.smoke, peak_tflops=peak,
                  peak=peak_text, settings=asdict(settings), checks=[], rows=[])
    print(f"device {device_name}, torch {torch.__version__}, lightning {L.__version__}; peak {peak_text}",
          flush=True)
    first_model = MATRIX[0].model if cuda else SMOKE_MODELS[MATRIX[0].model]
    vocab_size = model_config(first_model, settings).vocab_size
    batches = micro_batches(settings, vocab_size)
    report["checks"] = fp32_checks(settings, first_model, batches[0])
    release()
    write(report, args.out)
    for row in MATRIX:
        result = run_row(row, settings, batches, deadline, args.row_reserve_s, peak)
        report["rows"].append(result)
        write(report, args.out)
        print(f"{result['row']}: {result['status']}, {fmt(result.get('tokens_per_s'), ',.0f')} tokens/s, "
              f"MFU {fmt(result.get('mfu'), '.1%')}, peak {fmt(result.get('peak_memory_gib'), '.1f')} GiB, "
              f"loss {fmt(result.get('first_loss'), '.3f')} -> {fmt(result.get('last_loss'), '.3f')} "
              f"{result['error'] or result['note']}", flush=True)
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    failed = [c for c in report["checks"] if c["passed"] is False] + [r for r in report["rows"]
                                                                       if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
