"""The GPU path in one short run: FlexAttention against SDPA, the compiled layers, the precisions.

    python benchmarks/gpu_check.py           # glm-base-sized layers; prints timings too
    python benchmarks/gpu_check.py --smoke   # the tiny preset: correctness only, about a minute

Checks, each printed as one ``ok``/``FAIL`` line (the exit code is the number of failures):

* flex equals sdpa in the forward pass (logits at the real tokens) on a padded blank-infilling
  batch, on the shared-context cloze mask, and in greedy KV-cache decoding (same tokens);
* on CUDA also in the backward pass (gradients), and a training step with ``compile=True`` on
  flex under bf16 autocast and under bf16 weights has a finite fp32 loss;
* the compiled layers add one graph for batches of several sizes and lengths.

Without CUDA only the forward checks run (FlexAttention has no backward pass on CPU). Timings
(``--smoke`` off, CUDA only) are medians of training steps: sdpa eager, flex eager, flex compiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from glm_lightning.attention_mask import candidate_attention_mask, real_lengths
from glm_lightning.generation import generate
from glm_lightning.model import GLMConfig, GLMModel

VOCAB = 30592
failures = 0


def check(name: str, passed: bool, detail: str = "") -> None:
    global failures
    failures += not passed
    print(f"{'ok  ' if passed else 'FAIL'} {name}{f'  ({detail})' if detail else ''}", flush=True)


def padded_batch(batch: int, length: int, device: torch.device, seed: int = 0) -> dict:
    """Blank-infilling layout: Part A, one span in Part B at its [MASK] slot, right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (batch, length), generator=g)
    positions = torch.zeros(batch, 2, length, dtype=torch.long)
    real = torch.randint(length // 2, length + 1, (batch,), generator=g)
    real[0] = length
    sep = (real * 0.8).long()
    for b in range(batch):
        n, s = int(real[b]), int(sep[b])
        positions[b, 0, :s] = torch.arange(s)
        positions[b, 0, s:n] = s - 1
        positions[b, 1, s:n] = torch.arange(1, n - s + 1)
        ids[b, n:] = 0
    loss_mask = (torch.arange(length)[None] >= sep[:, None]) & (torch.arange(length)[None] < real[:, None])
    return {k: v.to(device) for k, v in dict(input_ids=ids, position_ids=positions, sep=sep,
                                               loss_mask=loss_mask, targets=torch.roll(ids, -1, 1)).items()}


def loss_of(model: GLMModel, batch: dict) -> torch.Tensor:
    mask = batch["loss_mask"]
    logits = model(batch["input_ids"], batch["position_ids"], batch["sep"], output_mask=mask)
    return torch.nn.functional.cross_entropy(logits, batch["targets"][mask])


def on(model: GLMModel, backend: str, run: Callable[[], object]) -> object:
    model.config.attention = backend
    return run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, no timings")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    name, (B, L) = ("tiny", (4, 200)) if args.smoke else ("glm-base", (8, 512))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{name} x{B}x{L}", flush=True)
    overrides = dict(vocab_size=VOCAB, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                     output_dropout_prob=0.0, max_sequence_length=512)
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name(name, **overrides)).to(device)
    batch = padded_batch(B, L, device)
    atol = 2e-4 if cuda else 1e-5  # TF32-free fp32; GPU kernels accumulate in other orders

    with torch.no_grad():
        model.eval()
        real = torch.arange(L, device=device)[None] < real_lengths(batch["position_ids"])[:, None]
        sdpa, flex = (on(model, b, lambda: model(batch["input_ids"], batch["position_ids"], batch["sep"]))
                      for b in ("sdpa", "flex"))
        error = (flex[real] - sdpa[real]).abs().max().item()
        check("flex == sdpa forward, padded blank-infilling batch", error < atol, f"max |diff| {error:.1e}")
        candidates = torch.full((B, L), -1, device=device)
        candidates[:, L // 2:] = torch.arange(L - L // 2, device=device) // 7  # candidates of 7 tokens
        mask = candidate_attention_mask(torch.full((B,), L // 2, device=device), candidates)
        sdpa, flex = (on(model, b, lambda: model(batch["input_ids"], batch["position_ids"],
                                                 attention_mask=mask)) for b in ("sdpa", "flex"))
        error = (flex - sdpa).abs().max().item()
        check("flex == sdpa forward, shared-context candidate mask", error < atol, f"max |diff| {error:.1e}")
        contexts = batch["position_ids"][:, 0].clone()
        sep = batch["sep"]
        contexts[torch.arange(L, device=device)[None] >= sep[:, None]] = 0
        decoded = [on(model, b, lambda: generate(model, batch["input_ids"], torch.stack(
            [contexts, torch.zeros_like(contexts)], 1), sep, sep - 1, sop_id=5, eop_id=6, max_new_tokens=8))
            for b in ("sdpa", "flex")]
        check("flex == sdpa greedy KV-cache decoding", decoded[0] == decoded[1])

    if cuda:
        model.train()
        grads = []
        for backend in ("sdpa", "flex"):
            model.zero_grad()
            on(model, backend, lambda: loss_of(model, batch)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
        check("flex == sdpa gradients", error < 1e-3, f"relative error {error:.1e}")
        model.config.compile = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = on(model, "flex", lambda: loss_of(model, batch))
        loss.backward()
        check("compiled flex step under bf16-mixed", loss.dtype == torch.float32 and bool(loss.isfinite()))
        bf16 = GLMModel(GLMConfig.from_name(name, **overrides, attention="flex", compile=True)).to(device)
        bf16 = bf16.to(torch.bfloat16).train()
        loss = loss_of(bf16, batch)
        loss.backward()
        check("compiled flex step under bf16-true", loss.dtype == torch.float32 and bool(loss.isfinite()))

    model.config.attention, model.config.compile = "sdpa", True
    model.train() if cuda else model.eval()
    torch._dynamo.reset()
    counters.clear()
    with torch.set_grad_enabled(cuda):
        for b, length in ((B, L), (B - 1, L - 40), (B - 2, L - 90)):
            loss = loss_of(model, padded_batch(b, length, device, seed=length))
            if cuda:
                loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    check("compiled layers: one graph for three batch shapes", graphs == 1, f"{graphs} graphs")

    if cuda and not args.smoke:
        model.train()
        seconds: dict[str, list[float]] = {}
        for label, backend, compiled in (("sdpa", "sdpa", False), ("flex", "flex", False),
                                         ("flex compiled", "flex", True)):
            model.config.attention, model.config.compile = backend, compiled
            for step in range(6):
                torch.cuda.synchronize()
                start = time.perf_counter()
                loss_of(model, batch).backward()
                torch.cuda.synchronize()
                if step >= 2:
                    seconds.setdefault(label, []).append(time.perf_counter() - start)
        base = statistics.median(seconds["sdpa"])
        for label, times in seconds.items():
            median = statistics.median(times)
            print(f"train step {label}: {median * 1e3:.1f} ms ({base / median:.2f}x sdpa)")
    print(f"{failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
