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
from pathlib import Path

import pytest
from test_parallel import (  # noqa: F401 (fixtures)
    EPOCHS,
    assert_same_weights,
    batches_file,
    free_port,
    load_weights,
    single_process_weights,
)

ROOT = Path(__file__).resolve().parents[1]
NODES = 2
TIMEOUT_S = 240  # a two-node run of the tiny model on a loaded 2-core machine


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
    """Start both nodes of a job (each in its own process group, as on its own machine)."""
    port = free_port()
    processes = []
    for node in range(NODES):
        command, env = LAUNCHERS[launcher](node, port, program)
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return processes


def finish_nodes(processes: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
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
