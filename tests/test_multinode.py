"""Two "nodes" on one host (gloo on CPU), started as a cluster starts them: by ``torchrun --nnodes=2
--nproc-per-node=1`` with its rendezvous on 127.0.0.1, and as ``srun`` does, with the SLURM_* variables of
a two-task job (Lightning's ``SLURMEnvironment``). Under both launchers DDP and FSDP2 end with the
weights of one process trained on the same global batches (the script and the reasoning of
``tests/test_parallel.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from test_parallel import (  # noqa: F401 (fixtures)
    EPOCHS,
    assert_same_weights,
    batches_file,
    free_port,
    load_weights,
    single_process_weights,
)
from timeouts import HANG_S

ROOT = Path(__file__).resolve().parents[1]
NODES = 2


def node_env(**extra: str) -> dict[str, str]:
    """The environment of one node's process: no launcher variables of the calling process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PL_", "TORCHELASTIC_", "GLM_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                         "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(node: int, port: int, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """Node ``node`` of a two-node torchrun job; ``program`` is a script and its arguments, or ``-m``
    and a module."""
    return ([sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc-per-node=1",
             f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", *program],
            node_env())


def slurm(node: int, port: int, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """Task ``node`` of a two-node, one-task-per-node SLURM job, with the variables srun sets."""
    variables = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="glm", SLURM_NTASKS=str(NODES),
                     SLURM_NNODES=str(NODES), SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(node),
                     SLURM_LOCALID="0", SLURM_NODEID=str(node), SLURM_NODELIST="127.0.0.1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [sys.executable, *program], node_env(**variables)


LAUNCHERS = {"torchrun": torchrun, "slurm": slurm}


def start_nodes(launcher: str, program: list[str]) -> list[subprocess.Popen]:
    """Start both nodes of a job (each in its own process group, as on its own machine); ``{node}`` in
    an argument becomes the node's number (a node-local path)."""
    port = free_port()
    processes = []
    for node in range(NODES):
        command, env = LAUNCHERS[launcher](node, port, [arg.format(node=node) for arg in program])
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return processes


def finish_nodes(processes: list[subprocess.Popen], timeout: float = HANG_S) -> list[str]:
    """Wait for every node; their logs. All are killed when one does not end in time."""
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("a node did not finish in time:\n"
                    + "\n".join(p.communicate()[0][-3000:] for p in processes))
    return logs


def run_nodes(launcher: str, program: list[str]) -> list[str]:
    processes = start_nodes(launcher, program)
    logs = finish_nodes(processes)
    for node, (process, log) in enumerate(zip(processes, logs, strict=True)):
        assert process.returncode == 0, f"node {node} failed:\n{log[-5000:]}"
    return logs


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "strategy"), [
    ("torchrun", "ddp"), ("torchrun", "fsdp"), ("slurm", "ddp"), ("slurm", "fsdp"),
])
def test_two_nodes_train_the_weights_of_one_process(
    batches_file: Path, single_process_weights: dict, tmp_path: Path, launcher: str, strategy: str  # noqa: F811
) -> None:
    script = str(ROOT / "tests" / "test_parallel.py")
    run_nodes(launcher, [script, "--strategy", strategy, "--nodes", str(NODES), "--batches",
                         str(batches_file), "--out", str(tmp_path), "--epochs", str(EPOCHS)])
    result = json.loads((tmp_path / "result.json").read_text())
    expected_environment = {"torchrun": "TorchElasticEnvironment", "slurm": "SLURMEnvironment"}[launcher]
    assert (result["cluster_environment"], result["world_size"]) == (expected_environment, NODES)
    assert result["strategy"] == {"ddp": "DDPStrategy", "fsdp": "FSDP2Strategy"}[strategy]
    assert_same_weights(load_weights(tmp_path), single_process_weights)


def pretraining(root: Path, corpus: Path, tokenizer: str, cache: str, *extra: str) -> list[str]:
    """The pretraining job on two nodes of one device each, into the shared ``root``/outputs."""
    return ["-m", "experiments.run", "exp=quickstart", f"output_dir={root / 'outputs'}", "run_name=cluster",
            f"data.cache_dir={cache}", f"data.train_files=[{corpus}]", f"tokenizer.path={tokenizer}",
            "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
            "data.val_fraction=0.1", "trainer.max_steps=6", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
            "trainer.devices=1", f"trainer.num_nodes={NODES}", *extra]


def tokenized(log: str, corpus: Path) -> int:
    """How often a node's log shows the corpus being tokenized (the progress bar's title)."""
    return log.count(f"tokenizing {corpus.name}")


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "strategy", "caches"), [
    ("torchrun", "ddp", "node-local"), ("slurm", "fsdp", "shared"),
])
def test_pretraining_on_two_nodes_prepares_tracks_and_checkpoints_once_per_job(
    tmp_path: Path, make_text, sentencepiece_model: str, launcher: str, strategy: str, caches: str
) -> None:
    """Node-local caches are prepared once per node, a shared one once in all; one MLflow run,
    written by global rank 0; each checkpoint written once, by rank 0, into the shared output folder."""
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\f".join(make_text(4, seed=k) for k in range(30)), encoding="utf-8")
    cache = str(tmp_path / ("node{node}-cache" if caches == "node-local" else "shared-cache"))
    logs = run_nodes(launcher, pretraining(tmp_path, corpus_file, sentencepiece_model, cache,
                                           f"trainer.strategy={strategy}"))
    counts = [tokenized(log, corpus_file) for log in logs]
    assert sorted(counts) == ([1, 1] if caches == "node-local" else [0, 1]), counts
    caches_made = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith("cache"))
    assert caches_made == (["node0-cache", "node1-cache"] if caches == "node-local" else ["shared-cache"])
    for name in caches_made:
        assert len(list((tmp_path / name).glob("*.json"))) == 1  # one shard of the one file

    run_dir = tmp_path / "outputs" / "quickstart" / "cluster"
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 6  # each step logged once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 6
    best = Path(summary["best_checkpoint"]).name
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.ckpt", best}  # no partial files
    assert sum("finished 6 steps" in log for log in logs) == 1  # global rank 0 reports


@pytest.mark.slow
def test_a_lost_node_stops_the_other_naming_it_and_resume_auto_continues(
    tmp_path: Path, make_text, sentencepiece_model: str
) -> None:
    """SLURM job of two nodes; node 1 is SIGKILLed mid-run. Node 0 stops well within the collective
    timeout, with one line naming rank 1; the checkpoints stay whole, and relaunching both nodes with
    resume=auto continues from the last one in the same MLflow run."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\f".join(make_text(4, seed=k) for k in range(30)), encoding="utf-8")
    timeout_s = 60
    program = pretraining(tmp_path, corpus, sentencepiece_model, str(tmp_path / "node{node}-cache"),
                          "trainer.strategy=ddp", f"trainer.collective_timeout_s={timeout_s}",
                          "trainer.max_steps=100000")
    run_dir = tmp_path / "outputs" / "quickstart" / "cluster"
    last = run_dir / "checkpoints" / "last.ckpt"
    nodes = start_nodes("slurm", program)
    deadline = time.monotonic() + HANG_S
    while not last.exists() and time.monotonic() < deadline and all(p.poll() is None for p in nodes):
        time.sleep(0.5)
    assert last.exists(), finish_nodes(nodes, timeout=1)
    time.sleep(2)  # a few more steps, some of them mid-collective
    os.killpg(nodes[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    log = finish_nodes(nodes[:1], timeout=timeout_s + 60)[0]
    waited = time.monotonic() - killed
    print(f"node 0 stopped {waited:.1f} s after node 1 was killed")
    nodes[1].communicate()
    assert nodes[0].returncode == 1 and waited < timeout_s, (waited, log[-3000:])
    assert "Traceback" not in log, log[-5000:]
    # (the progress bar on stdout may share the terminal line)
    (line,) = [line[line.index("error: "):] for line in log.splitlines() if "lost rank" in line]
    assert line.startswith("error: lost rank 1 (node 1, host ") and line.endswith(
        f"the last checkpoint is {last}; relaunch every node with resume=auto to continue")
    assert sorted(p.name for p in last.parent.iterdir() if not p.name.endswith(".ckpt")) == []  # no partials
    stopped_at = torch.load(last, weights_only=False)["global_step"]

    logs = run_nodes("slurm", [*program[:-1], f"trainer.max_steps={stopped_at + 3}", "resume=auto"])
    assert sum(f"finished {stopped_at + 3} steps (3 in this run, resumed at {stopped_at})" in log
               for log in logs) == 1, logs[0][-3000:]
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = store.search_runs([store.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) >= stopped_at + 2


def test_lost_ranks_are_those_whose_heartbeat_stands_still(tmp_path: Path) -> None:
    """Rank 1 beats, rank 2 stopped, rank 3 never wrote: 2 and 3 are lost, not 1 (nor oneself, 0)."""
    from experiments.lost_rank import HEARTBEAT_S, lost_ranks

    for rank in (0, 1, 2):
        record = {"rank": rank, "node": rank, "host": "h", "pid": 7}
        (tmp_path / f"{rank}.json").write_text(json.dumps(record))
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(HEARTBEAT_S / 2):
            os.utime(tmp_path / "1.json")

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        lost = lost_ranks(tmp_path, world_size=4, own_rank=0, window=2.0)
    finally:
        beating.set()
        thread.join()
    assert lost == [{"rank": 2, "node": 2, "host": "h", "pid": 7},
                    {"rank": 3, "node": "?", "host": "?", "pid": "?"}]


def test_the_collective_timeout_reaches_the_process_group() -> None:
    from datetime import timedelta

    from glm_lightning.parallel import build_strategy

    for name in ("ddp", "fsdp"):
        strategy = build_strategy(name, accelerator="cpu", collective_timeout_s=42)
        assert strategy._timeout == timedelta(seconds=42), name
