"""Training-step throughput, peak memory and MFU of GLMModel next to GPT-2 and BERT of the same shape,
each eager and, for GLM and GPT-2, compiled.

One step is forward + loss + backward + AdamW step, in fp32 with dropout 0.1 everywhere:

* GLM: a blank-infilling batch (Part A ~85% of the length, one generated span as Part B with 2D
  positions), the pretraining loss on Part B only, with the output projection applied at the
  Part-B positions only (``output_mask``), as ``GLMPretrainModule.loss`` does;
* GPT-2 (``GPT2LMHeadModel``): causal LM loss on every token;
* BERT (``BertForMaskedLM``): MLM loss on 15% of the tokens.

The Hugging Face models get the same layers / hidden / heads / FFN / vocabulary / positions, the
tanh GeLU and ``attn_implementation="sdpa"``. "compiled" is ``GLMConfig.compile`` (every layer
through one ``torch.compile``'d function, ``model.compile=true``) for GLM and ``torch.compile`` of
the whole model for GPT-2; they compile in the warm-up round. Timed steps alternate between the
models (the order rotates every round) so that machine noise hits all of them alike; the median
and the fastest step are reported. Timed rounds stop at a deadline so that a busy machine still
finishes. Peak memory is the peak resident set size (``ru_maxrss``) of a fresh child process per
eager model (compiled models are not measured: the compiler's own memory would dominate) that runs
two steps (the second one holds activations, gradients and AdamW state at once); it is reported
in full and above the same child's RSS after imports. The achieved model FLOP/s use the analytic
model FLOPs of ``glm_lightning.flops`` (GLM credited with the output projection at its Part-B
positions only, the work it does); the peak they are a fraction of is a dense fp32 ``torch.mm``
of two 2048 x 2048 matrices at the same thread count, measured once in every round. Last, one
eager GLM step runs under ``torch.profiler`` and its largest operators are listed.

    python benchmarks/bench_train_step.py    # under 5 minutes: timed rounds stop at --total-s
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from machine import cpu_model
from torch import Tensor, nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from glm_lightning.flops import training_flops_per_batch
from glm_lightning.model import GLMConfig, GLMModel

MODELS = ("GLM", "GLM compiled", "GPT-2", "GPT-2 compiled", "BERT")
EAGER = ("GLM", "GPT-2", "BERT")
# glm-base with half the layers and a smaller width, so that a step takes seconds on a CPU.
LAYERS, HIDDEN, HEADS, FFN, VOCAB, POSITIONS, DROPOUT = 6, 512, 8, 2048, 30592, 512, 0.1
PART_A_FRACTION = 0.85
MATMUL_SIZE = 2048

Step = Callable[[], None]
Built = tuple[nn.Module, Callable[[], Tensor]]  # the model and its loss on a fixed batch


def glm_config(compile: bool = False) -> GLMConfig:
    return GLMConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
                     vocab_size=VOCAB, max_sequence_length=POSITIONS, embedding_dropout_prob=DROPOUT,
                     attention_dropout_prob=DROPOUT, output_dropout_prob=DROPOUT, compile=compile)


def glm_sep(batch_size: int, seq_length: int) -> Tensor:
    """Part-A lengths around 85% of the sequence, different per sample as in real batches."""
    return torch.tensor([round(PART_A_FRACTION * seq_length) - 4 * b for b in range(batch_size)])


def model_flops(name: str, batch_size: int, seq_length: int) -> float:
    """Model FLOPs of one step: GLM projects its Part-B positions only, the others every position."""
    part_b = int((seq_length - glm_sep(batch_size, seq_length)).sum()) if name.startswith("GLM") else None
    return training_flops_per_batch(glm_config(), batch_size, seq_length, output_tokens=part_b)


def build_glm(batch_size: int, seq_length: int, g: torch.Generator, compile: bool = False) -> Built:
    """GLM on a blank-infilling batch: Part A bidirectional, one span generated in Part B."""
    model = GLMModel(glm_config(compile))
    ids = torch.randint(VOCAB, (batch_size, seq_length), generator=g)
    targets = torch.randint(VOCAB, (batch_size, seq_length), generator=g)
    sep = glm_sep(batch_size, seq_length)
    positions = torch.zeros(batch_size, 2, seq_length, dtype=torch.long)
    for b, s in enumerate(sep.tolist()):
        positions[b, 0, :s] = torch.arange(s)
        positions[b, 0, s:] = s - 1  # the span is generated at its [MASK] slot in Part A
        positions[b, 1, s:] = torch.arange(1, seq_length - s + 1)
    loss_mask = torch.arange(seq_length)[None] >= sep[:, None]
    # As GLMPretrainModule.loss: the output projection only at the predicted (Part-B) positions.
    return model, lambda: F.cross_entropy(model(ids, positions, sep, output_mask=loss_mask),
                                          targets[loss_mask])


def build_gpt2(batch_size: int, seq_length: int, g: torch.Generator, compile: bool = False) -> Built:
    config = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                        n_inner=FFN, activation_function="gelu_pytorch_tanh", resid_pdrop=DROPOUT,
                        embd_pdrop=DROPOUT, attn_pdrop=DROPOUT, layer_norm_epsilon=1e-5,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    ids = torch.randint(VOCAB, (batch_size, seq_length), generator=g)
    run = torch.compile(model) if compile else model
    return model, lambda: run(input_ids=ids, labels=ids).loss


def build_bert(batch_size: int, seq_length: int, g: torch.Generator) -> Built:
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN, hidden_act="gelu_pytorch_tanh",
                        hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT,
                        max_position_embeddings=POSITIONS, layer_norm_eps=1e-5)
    model = BertForMaskedLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    ids = torch.randint(VOCAB, (batch_size, seq_length), generator=g)
    masked = torch.rand(batch_size, seq_length, generator=g) < 0.15
    labels = torch.where(masked, ids, -100)
    return model, lambda: model(input_ids=ids, labels=labels).loss


BUILDERS: dict[str, Callable[..., Built]] = {
    "GLM": build_glm, "GLM compiled": lambda *args: build_glm(*args, compile=True),
    "GPT-2": build_gpt2, "GPT-2 compiled": lambda *args: build_gpt2(*args, compile=True), "BERT": build_bert,
}


def make_step(name: str, batch_size: int, seq_length: int) -> tuple[Step, int]:
    """A closure running one training step of ``name``, and the model's parameter count."""
    torch.manual_seed(0)
    model, loss_fn = BUILDERS[name](batch_size, seq_length, torch.Generator().manual_seed(1))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def matmul_flops_per_s(repeats: int = 3) -> float:
    """Best fp32 matmul throughput of a few large square products: the achievable peak."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * MATMUL_SIZE**3 / best


def peak_rss_child(name: str, batch_size: int, seq_length: int, threads: int) -> dict:
    """Peak memory of two training steps of ``name``, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", name, "--batch-size", str(batch_size),
           "--seq-length", str(seq_length), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_child(name: str, batch_size: int, seq_length: int) -> None:
    """Runs in the child: prints ``ru_maxrss`` (KiB on Linux) after imports and after two steps."""
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, _ = make_step(name, batch_size, seq_length)
    step()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "after_imports_mib": after_imports / 1024}))


def timed_rounds(steps: dict[str, Step], warmup: int, repeats: int, min_repeats: int,
                 deadline: float) -> tuple[dict[str, list[float]], list[float]]:
    """Step seconds per model and matmul FLOP/s, one of each per round, the model order rotating.

    After ``min_repeats`` timed rounds, no round starts that would end after ``deadline`` (a
    ``time.perf_counter`` value, judged by the previous round), so a busy machine still finishes.
    """
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    matmul: list[float] = []
    names = list(steps)
    for r in range(warmup + repeats):
        round_start = time.perf_counter()
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                seconds[name].append(time.perf_counter() - t0)
        if r >= warmup:
            matmul.append(matmul_flops_per_s())
            now = time.perf_counter()
            if len(matmul) >= min_repeats and now + (now - round_start) > deadline:
                break
    return seconds, matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=POSITIONS)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (every model once)")
    parser.add_argument("--repeats", type=int, default=10, help="most timed rounds (every model once)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed rounds")
    parser.add_argument("--total-s", type=float, default=280.0,
                        help="no timed round beyond --min-repeats starts that would end after this")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--profile-top", type=int, default=12,
                        help="operators of a profiled GLM step to list (0: no profile)")
    parser.add_argument("--memory-of", choices=EAGER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    deadline = time.perf_counter() + args.total_s
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.memory_of:
        memory_child(args.memory_of, args.batch_size, args.seq_length)
        return

    B, L = args.batch_size, args.seq_length
    print(f"date {datetime.date.today()}  cpu {cpu_model()}  nproc {os.cpu_count()}  "
          f"torch.get_num_threads() {torch.get_num_threads()}  load average {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"python {platform.python_version()}")
    print(f"shape: layers {LAYERS}, hidden {HIDDEN}, heads {HEADS}, FFN {FFN}, vocab {VOCAB}, "
          f"batch {B} x seq {L}, fp32, dropout {DROPOUT}")

    memory = {name: peak_rss_child(name, B, L, args.threads) for name in EAGER}
    steps, params = {}, {}
    for name in MODELS:
        steps[name], params[name] = make_step(name, B, L)
    seconds, matmul = timed_rounds(steps, args.warmup, args.repeats, args.min_repeats, deadline)

    report(seconds, matmul, memory, params, B, L)
    if args.profile_top:
        profile(steps["GLM"], args.profile_top)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def report(seconds: dict[str, list[float]], matmul: list[float], memory: dict[str, dict],
           params: dict[str, int], batch_size: int, seq_length: int) -> None:
    """Markdown table, ratios of tokens/s, and the model FLOP/s as a fraction of the matmul peak.

    Besides medians and best steps, the per-round ratio compares steps run back to back, so it is
    the least sensitive to the machine's load changing during the run. Each model is credited
    with its own model FLOPs (``model_flops``; BERT's extra MLM-head transform, under 1% more, is
    not credited).
    """
    tokens = batch_size * seq_length
    peak, best_peak = statistics.median(matmul), max(matmul)
    median = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    best = {name: tokens / min(s) for name, s in seconds.items()}
    glm, full = (model_flops(name, batch_size, seq_length) / 1e9 for name in ("GLM", "GPT-2"))
    print(f"{len(matmul)} timed rounds; model FLOPs per step: GLM {glm:.1f} G (output projection at the "
          f"Part-B positions), GPT-2 and BERT {full:.1f} G; fp32 torch.mm {MATMUL_SIZE}^3 at "
          f"{torch.get_num_threads()} threads (the peak): median {peak / 1e9:.1f}, "
          f"best {best_peak / 1e9:.1f} GFLOP/s\n")
    print("| model | params (M) | tokens/s median | tokens/s best | model GFLOP/s median "
          "| of the peak (median) | of the peak (best step, best peak) | peak RSS (MiB) "
          "| peak RSS above imports (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        per_token = model_flops(name, batch_size, seq_length) / tokens
        rss = above = "-"
        if name in memory:
            rss = f"{memory[name]['peak_mib']:.0f}"
            above = f"{memory[name]['peak_mib'] - memory[name]['after_imports_mib']:.0f}"
        print(f"| {name} | {params[name] / 1e6:.1f} | {median[name]:.0f} | {best[name]:.0f} "
              f"| {median[name] * per_token / 1e9:.1f} | {median[name] * per_token / peak:.1%} "
              f"| {best[name] * per_token / best_peak:.1%} | {rss} | {above} |")
    print()

    def ratio(model: str, others: tuple[str, ...]) -> None:
        """tokens/s of ``model`` over the fastest of ``others``."""
        def of(tps: dict[str, float]) -> float:
            return tps[model] / max(tps[other] for other in others)

        rounds = [of({name: 1 / s for name, s in zip(MODELS, r, strict=True)})
                  for r in zip(*(seconds[name] for name in MODELS), strict=True)]
        against = f"max({', '.join(others)})" if len(others) > 1 else others[0]
        print(f"{model} / {against} tokens/s: medians {of(median):.3f}, best steps {of(best):.3f}, per "
              f"round {statistics.median(rounds):.3f} (median; range {min(rounds):.2f}-{max(rounds):.2f})")

    ratio("GLM", ("GPT-2", "BERT"))
    ratio("GLM compiled", ("GPT-2",))
    ratio("GLM compiled", ("GPT-2 compiled",))
    ratio("GLM compiled", ("GLM",))
    ratio("GPT-2 compiled", ("GPT-2",))
    for other in ("GPT-2", "BERT"):
        print(f"GLM / {other} peak RSS: {memory['GLM']['peak_mib'] / memory[other]['peak_mib']:.3f}")


def profile(step: Step, top: int) -> None:
    """The ``top`` operators of one step by their own CPU time, and the optimizer's share."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    print(f"\nprofile of one eager GLM step: {total / 1e3:.0f} ms of operator CPU time (all threads' "
          f"time counted once per operator call); the optimizer step (AdamW) {optimizer / total:.1%}\n")
    print("| operator | calls | self CPU (ms) | share |")
    print("|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        share = e.self_cpu_time_total / total
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.0f} | {share:.1%} |")


if __name__ == "__main__":
    main()
