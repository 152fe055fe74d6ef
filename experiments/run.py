"""Command line: python -m experiments.run exp=NAME key=value ...

Loads the experiment config, prints the settings its job reads (``print_config=true``: the whole
resolved config, and nothing runs), then hands it to the registered job. Configuration mistakes
end the program with one line on stderr and exit code 2, before anything heavy is imported; so do
missing input files and folders, all of them at once (``experiments.inputs``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType


def _stopped_during_start_up(signum: int, frame: FrameType | None) -> None:
    """SIGTERM before the job's own handler is installed (while Python imports): one line, 130."""
    print(f"stopped: terminated by {signal.Signals(signum).name} during start-up (nothing was written)",
          file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":  # the command line: from its first import on, not when imported by a program
    signal.signal(signal.SIGTERM, _stopped_during_start_up)

from omegaconf import DictConfig  # noqa: E402

from datamodules.corpus import CorpusError  # noqa: E402
from experiments.config import ConfigError, config_summary, format_config, list_experiments, load_config  # noqa: E402
from experiments.errors import LostRank, RunInterrupted  # noqa: E402
from experiments.inputs import checkpoint_settings, loads_tokenizer, missing_inputs  # noqa: E402
from experiments.jobs import SECTIONS, get_job  # noqa: E402
from experiments.library_noise import quiet_libraries  # noqa: E402
from experiments.threads import torch_threads  # noqa: E402
from glm_lightning.atomic import is_disk_full  # noqa: E402

DEFAULT_EXPERIMENT = "quickstart"
USAGE_ERROR = 2
INTERRUPTED = 130  # the shell's code for a run stopped by a signal
RESUMABLE = ("pretrain", "seq2seq", "superglue")  # jobs that continue a run with resume=auto


def usage() -> str:
    """Help text: syntax, an example and the shipped experiments."""
    experiments = list_experiments()
    width = max(map(len, experiments), default=0)
    listing = "\n".join(f"  {name.ljust(width)}  {description}" for name, description in experiments.items())
    return f"""usage: python -m experiments.run [exp=NAME] [key=value ...]

Runs experiment NAME (default: {DEFAULT_EXPERIMENT}). Its config is configs/base.yaml, then
configs/NAME.yaml, then the key=value overrides in order. Keys are dotted paths into the config
(model.name, data.batch_size, optim.lr, trainer.max_steps, ...); values are YAML: 3, 1e-4, true,
null, [a,b]. print_config=true prints the resolved config and exits.

example:
  python -m experiments.run exp=quickstart trainer.max_steps=50 optim.lr=3e-4 print_config=true

experiments:
{listing}
"""


def parse_args(args: Sequence[str]) -> tuple[str, list[str]]:
    """Split the arguments into the experiment name and the remaining overrides."""
    exp, overrides = DEFAULT_EXPERIMENT, []
    for argument in args:
        if argument.startswith("-"):
            raise ConfigError(f"unknown option {argument!r}; arguments are key=value overrides (see --help)")
        if argument.startswith("exp="):
            exp = argument.removeprefix("exp=")
        else:
            overrides.append(argument)
    return exp, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(usage())
        return 0
    try:
        exp, overrides = parse_args(args)
        cfg = load_config(exp, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    missing = [] if cfg.print_config else missing_inputs(cfg)
    if missing:  # every missing input at once, before any start-up
        print("".join(f"error: {line}\n" for line in missing), end="", file=sys.stderr)
        return USAGE_ERROR
    # A YAML comment, so that the printed config stays valid YAML (print_config=true).
    default = "" if any(a.startswith("exp=") for a in args) else " (the default; see --help for the others)"
    print(f"# running exp={exp}{default}", flush=True)
    if cfg.print_config:
        print(format_config(cfg), end="", flush=True)
        return 0
    omit = ("tokenizer.vocab_size", "tokenizer.model_type") if loads_tokenizer(cfg) else ()
    print(config_summary(cfg, SECTIONS.get(cfg.job, ()), omit), end="", flush=True)
    for line in checkpoint_settings(cfg):  # what is used, where the checkpoint decides
        print(line, flush=True)
    with torch_threads(cfg) as threads:
        print(threads, flush=True)
        return run_job(cfg)


def run_job(cfg: DictConfig) -> int:
    """Run the job of ``cfg``, its errors and interruptions reported in one line; the exit code."""
    quiet_libraries()
    from experiments.interruption import INTERRUPTIONS, interruptible  # imports Lightning

    try:
        with interruptible():
            get_job(cfg.job)(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except (FileNotFoundError, CorpusError, LostRank, FloatingPointError) as error:
        # bad input data (the message names the file), another node lost (named), a non-finite loss
        # (the message says where to continue from): one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if not is_disk_full(error):
            raise
        then = "continue with resume=auto" if cfg.job in RESUMABLE else "run the same command again"
        print(f"error: {error.strerror} while writing {error.filename}; the files written before are intact "
              f"(free space, then {then})", file=sys.stderr)
        return 1
    except INTERRUPTIONS as error:  # SIGTERM or Ctrl-C: the MLflow run ended KILLED
        print(f"stopped: {error if isinstance(error, RunInterrupted) else 'interrupted'}", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
