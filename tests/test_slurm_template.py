"""docs/slurm.md: its batch script, rendered for 2 nodes of 1 GPU and run by bash with a stand-in
``srun``, hands ``srun`` a valid ``experiments.run`` command built only from variables SLURM sets."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from timeouts import HANG_S

from experiments.config import load_config
from glm_lightning.parallel import RECOMMENDED_PRECISION

ROOT = Path(__file__).resolve().parents[1]
# What sbatch sets in the batch script's environment for the options the template uses (SLURM docs,
# "OUTPUT ENVIRONMENT VARIABLES" of sbatch), and the node-local scratch folder of a job.
SET_BY_SLURM = {"SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS_PER_NODE", "TMPDIR"}


def batch_script() -> str:
    text = (ROOT / "docs" / "slurm.md").read_text(encoding="utf-8")
    section = text[text.index("## The batch script"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def render(script: str, nodes: int, gpus_per_node: int) -> str:
    values = {"nodes": nodes, "ntasks-per-node": gpus_per_node, "gpus-per-node": gpus_per_node}
    for option, value in values.items():
        script, count = re.subn(rf"^#SBATCH --{option}=\d+$", f"#SBATCH --{option}={value}", script,
                                flags=re.M)
        assert count == 1, option
    return script


def test_the_batch_script_starts_a_valid_run_on_every_node(tmp_path: Path) -> None:
    script = render(batch_script(), nodes=2, gpus_per_node=1)
    (tmp_path / "job.sbatch").write_text(script)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)

    own = {name for name in re.findall(r"^([A-Z_]+)=", script, re.M)}  # the script's own variables
    used = set(re.findall(r"\$\{?([A-Z_]+)", script)) - own
    assert used <= SET_BY_SLURM, used - SET_BY_SLURM
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SRUN_ARGS=str(tmp_path / "srun.args"), TMPDIR=str(tmp_path),
               SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="1")
    subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, check=True, timeout=HANG_S)

    argv = (tmp_path / "srun.args").read_text().split("\0")[:-1]
    assert argv[:4] == ["python", "-m", "experiments.run", "exp=pretrain"]
    cfg = load_config("pretrain", argv[4:])
    t = cfg.trainer
    assert (t.num_nodes, t.devices, t.accelerator) == (2, 1, "gpu")
    assert (t.strategy, t.precision, t.checkpoint_format) == ("fsdp", RECOMMENDED_PRECISION, "sharded")
    assert t.collective_timeout_s == 600
    assert (cfg.run_name, cfg.resume) == ("slurm-77", "auto")
    assert cfg.data.cache_dir == f"{tmp_path}/glm-cache"
