"""Peak host memory of loading a large official GLM checkpoint: one weight at a time against reading it whole.

Writes a synthetic fp16 checkpoint of about 1.1 B parameters (20 layers, hidden 2048, 32 heads, the GPT-2
vocabulary of GLM-2B/10B) as two model-parallel shards, exactly the official layout that
``glm_lightning.checkpoint`` reads (``release/mp_rank_0X_model_states.pt`` holding ``{"module": ...}``, and
``latest_checkpointed_iteration.txt``), into a temporary folder under /tmp that is deleted at the end. Then,
each in a fresh process (so that its peak is its own), loads it into a fp16 GLMModel:

* new: ``load_glm(folder, dtype=torch.float16)``: meta-device model, memory-mapped shards, merged and copied
  one weight at a time, file pages released after each;
* old: the loading path before it: ``torch.load`` of each shard whole, ``merge_model_parallel`` of all
  weights, ``load_state_dict(assign=True)`` into a meta-device model.

Peak RSS is the child's VmHWM (/proc/self/status; resident anonymous and file-backed pages, so memory-mapped
pages count). Each child also checks a few weights against the shards.

    python benchmarks/bench_load.py [--layers 20] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  (benchmarks/ is on the path as the script folder)

VOCAB = 50304


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def write_checkpoint(folder: Path, layers: int, hidden: int) -> int:
    """The official 2-way model-parallel layout of a random fp16 GLM; returns its parameter count."""
    import torch

    from glm_lightning.checkpoint import split_model_parallel
    from glm_lightning.model import GLMConfig, GLMModel

    config = GLMConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                       vocab_size=VOCAB, max_sequence_length=1024)
    with torch.device("meta"):
        shapes = GLMModel(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}, {}]
    for key, meta in shapes.items():  # one full weight at a time, split at once
        full = (torch.randn(meta.shape, generator=generator) * 0.02).half()
        for shard, part in zip(shards, split_model_parallel({key: full}, 2), strict=True):
            shard.update(part)
    (folder / "release").mkdir(parents=True)
    for rank, shard in enumerate(shards):
        name = f"mp_rank_{rank:02d}_model_states.pt"
        torch.save({"module": shard, "iteration": 0}, folder / "release" / name)
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    return sum(meta.numel() for meta in shapes.values())


def child(mode: str, folder: Path) -> None:
    """Load the checkpoint the ``mode`` way; print JSON with the peak RSS and the seconds."""
    import torch

    from glm_lightning.checkpoint import checkpoint_config, load_glm, merge_model_parallel, read_checkpoint
    from glm_lightning.model import GLMModel

    baseline = status_kb("VmRSS")
    started = time.perf_counter()
    if mode == "new":
        model = load_glm(folder, dtype=torch.float16)
    else:
        files = sorted((folder / "release").glob("mp_rank_*_model_states.pt"))
        weights = merge_model_parallel([torch.load(f, map_location="cpu", weights_only=True)["module"]
                                        for f in files])
        with torch.device("meta"):
            model = GLMModel(checkpoint_config(read_checkpoint(folder)))
        model.load_state_dict(weights, assign=True)
        model = model.to(torch.float16).eval()
        del weights
    seconds = time.perf_counter() - started
    shard = torch.load(folder / "release" / "mp_rank_01_model_states.pt", mmap=True, weights_only=True)
    shard, last = shard["module"], len(model.transformer.layers) - 1
    rows = shard["word_embeddings.weight"].shape[0]  # rank 1 holds the second half of the rows
    ok = (torch.equal(model.word_embeddings.weight[rows:], shard["word_embeddings.weight"])
          and torch.equal(model.transformer.layers[last].mlp.dense_4h_to_h.weight[:, -8:],
                          shard[f"transformer.layers.{last}.mlp.dense_4h_to_h.weight"][:, -8:])
          and model.word_embeddings.weight.dtype == torch.float16)
    print(json.dumps({"peak_kb": status_kb("VmHWM"), "baseline_kb": baseline, "seconds": seconds, "ok": ok,
                      "params": model.num_parameters()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bench_load_", dir="/tmp"))
    try:
        started = time.perf_counter()
        params = write_checkpoint(folder, args.layers, args.hidden)
        size = sum(f.stat().st_size for f in folder.rglob("*.pt"))
        print(f"machine: {cpu_model()}, {platform.machine()}, Python {platform.python_version()}, "
              f"torch {torch.__version__}")
        print(f"checkpoint: {params / 1e9:.3f} B parameters, fp16, 2 model-parallel shards, "
              f"{size / 2**30:.2f} GiB on disk (written in {time.perf_counter() - started:.0f} s)")
        print("| path | seconds | peak RSS GiB | peak / checkpoint | RSS after imports GiB |")
        print("|---|---:|---:|---:|---:|")
        for mode in ("new", "old"):
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(folder)],
                                  capture_output=True, text=True, check=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            assert result["ok"] and result["params"] == params, result
            peak = result["peak_kb"] * 1024
            print(f"| {mode} | {result['seconds']:.1f} | {peak / 2**30:.2f} | {peak / size:.2f}x | "
                  f"{result['baseline_kb'] * 1024 / 2**30:.2f} |")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
