"""Jobs stopped by real signals in real subprocesses, resumed, or fed bad input: every job ends the
same way (exit 130, one line, MLflow KILLED, a resumable checkpoint where it trains)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from test_superglue_job import overrides, pretrained, sentence, write_jsonl  # noqa: F401 (a fixture)
from timeouts import HANG_S

from experiments.run import main
from glm_lightning.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str]) -> subprocess.Popen:
    """``python -m experiments.run ARGS`` in its own process group, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    """Wait for ``process``; its stderr."""
    try:
        return process.communicate(timeout=HANG_S)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"no exit within {HANG_S} s:\n{process.communicate()[1][-3000:]}")


def wait_for(condition: Callable[[], object], process: subprocess.Popen, what: str) -> object:
    """Poll ``condition`` until it returns something true (the readiness signal of a test)."""
    deadline = time.time() + HANG_S
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{process.communicate()[1][-3000:]}")
        try:
            found = condition()
        except (OSError, MlflowException):  # the file or the store is still being written
            found = None
        if found:
            return found
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")


def runs(root: Path, experiment: str) -> list:
    store = client(root)
    found = store.get_experiment_by_name(experiment)
    return store.search_runs([found.experiment_id]) if found else []


def stopped_line(stderr: str) -> str:
    """The job's one line about the stop: the last line of stderr, and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def write_rte(root: Path, train: int) -> Path:
    for split, n in (("train", train), ("val", 4)):
        write_jsonl(root, "RTE", split, [
            {"idx": i, "premise": sentence(i), "hypothesis": sentence(i + i % 2),
             "label": "entailment" if i % 2 == 0 else "not_entailment"} for i in range(n)])
    return root


def rte(tmp_path: Path, checkpoint: Path, data: Path, *extra: str) -> list[str]:
    task = [f"superglue.tasks.rte.{key}" for key in ("max_seq_length=64", "epochs=1", "batch_size=4")]
    return ["exp=superglue", *overrides(tmp_path, checkpoint, f"data.superglue_dir={data}", "task=rte", *task,
                                        "trainer.log_every_n_steps=1", "superglue.test_predictions=false",
                                        *extra)]


@pytest.mark.slow
def test_sigterm_stops_superglue_after_a_step_and_resume_continues(tmp_path, pretrained):  # noqa: F811
    data = write_rte(tmp_path / "data", 1200)  # 300 steps
    process = start(rte(tmp_path, pretrained, data))
    store = client(tmp_path)

    def child_training():
        for child in runs(tmp_path, "superglue"):
            if child.data.tags.get("task") == "RTE" and len(
                    store.get_metric_history(child.info.run_id, "train/loss")) >= 3:
                return child
        return None

    child = wait_for(child_training, process, "three logged training steps")
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    task_dir = tmp_path / "outputs" / "superglue" / "sweep" / "RTE"
    last = task_dir / "checkpoints" / "last.ckpt"
    line = stopped_line(stderr)
    assert line.startswith("stopped: RTE interrupted at step ") and line.endswith(
        f"checkpoint saved to {last}; continue with resume=auto")
    parent_id = child.data.tags["mlflow.parentRunId"]
    assert store.get_run(child.info.run_id).info.status == "KILLED"
    assert store.get_run(parent_id).info.status == "KILLED"
    stopped_at = torch.load(last, weights_only=False)["global_step"]
    assert 3 <= stopped_at < 300 and f"at step {stopped_at};" in line

    resumed = start([*rte(tmp_path, pretrained, data), "resume=auto"])
    stderr = finish(resumed)
    assert resumed.returncode == 0, stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == 300
    (again,) = [r for r in runs(tmp_path, "superglue") if r.data.tags.get("task") == "RTE"]
    assert again.info.run_id == child.info.run_id and again.info.status == "FINISHED"
    assert store.get_run(parent_id).info.status == "FINISHED"
    steps = [m.step for m in store.get_metric_history(child.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) >= 299  # each step logged once, to the end
    assert (task_dir / "result.json").is_file()


def test_sigterm_during_start_up_ends_the_mlflow_run_killed(tmp_path, pretrained):  # noqa: F811
    """The parent MLflow run exists while the training examples are still being encoded."""
    data = write_rte(tmp_path / "data", 60000)
    process = start(rte(tmp_path, pretrained, data))
    run_dir = tmp_path / "outputs" / "superglue" / "sweep"
    run_id = wait_for(lambda: (run_dir / "mlflow_run_id").read_text().strip(), process, "the MLflow run")
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert stopped_line(stderr) == "stopped: terminated by SIGTERM outside a training step " \
                                   "(no checkpoint written now)"
    assert client(tmp_path).get_run(run_id).info.status == "KILLED"
    assert not (run_dir / "RTE" / "checkpoints").exists()  # training had not begun


def test_sigterm_stops_lm_eval_killed(tmp_path, pretrained, make_text):  # noqa: F811
    text = tmp_path / "text.txt"
    text.write_text(make_text(400), encoding="utf-8")
    process = start(["exp=lm_eval", f"model.init_from={pretrained}", f"lm_eval.file={text}",
                     "lm_eval.stride=1", "lm_eval.max_length=32", f"output_dir={tmp_path / 'outputs'}",
                     "trainer.accelerator=cpu"])
    (found,) = wait_for(lambda: runs(tmp_path, "lm_eval"), process, "the MLflow run")
    process.send_signal(signal.SIGTERM)
    stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert stopped_line(stderr).startswith("stopped: terminated by SIGTERM")
    assert client(tmp_path).get_run(found.info.run_id).info.status == "KILLED"


BERT_VOCAB = ROOT.parent / "shared" / "data" / "vocab" / "bert-base-uncased" / "vocab.txt"


@pytest.mark.parametrize("case", ["empty", "latin-1", "text as tokenizer", "BERT vocab as tokenizer",
                                  "one document", "vocabulary below the alphabet"])
def test_bad_input_is_one_line_before_training(tmp_path, capsys, make_text, case):
    """Each is refused with one line naming the file or key; bad files before a tokenizer is trained."""
    corpus, text = tmp_path / "corpus.txt", make_text(60)
    corpus.write_text(text, encoding="utf-8")
    documents = tmp_path / "docs.jsonl"
    documents.write_text("".join(f'{{"text": "{line}"}}\n' for line in text.splitlines() if line), "utf-8")
    if case == "BERT vocab as tokenizer" and not BERT_VOCAB.is_file():
        pytest.skip(f"{BERT_VOCAB} is absent")
    bad = {"empty": b"", "latin-1": b"A caf\xe9 au lait.\n"}
    if case in bad:
        (tmp_path / "bad.txt").write_bytes(bad[case])
    extra, expected = {
        "empty": ([f"data.train_files=[{documents},{tmp_path / 'bad.txt'}]"],
                  f"error: {tmp_path / 'bad.txt'}: file is empty"),
        "latin-1": ([f"data.train_files=[{documents},{tmp_path / 'bad.txt'}]"],
                    f"error: {tmp_path / 'bad.txt'}: not valid UTF-8 at byte offset 5"),
        "text as tokenizer": ([f"tokenizer.path={corpus}"],
                              f"error: tokenizer.path: {corpus} is not a sentencepiece model"),
        "BERT vocab as tokenizer": ([f"tokenizer.path={BERT_VOCAB}"],
                                    f"error: tokenizer.path: {BERT_VOCAB} is not a sentencepiece model"),
        "one document": ([f"data.train_files=[{corpus}]"],
                         "error: data.train_files: cannot split 1 document(s) into train and validation; "
                         "set data.val_files to held-out text or data.val_fraction=0"),
        "vocabulary below the alphabet": ([f"data.train_files=[{documents}]", "tokenizer.vocab_size=40"],
                                          "error: training a tokenizer on data.train_files with "
                                          "tokenizer.vocab_size=40 failed: Vocabulary size is smaller"),
    }[case]
    code = main(["exp=quickstart", f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
                 "tokenizer.vocab_size=600", "logging.enabled=false", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # besides progress bars
    assert code in (1, 2) and "Traceback" not in err
    assert len(errors) == 1 and errors[0].startswith(expected), errors
    if case != "one document":  # a readable corpus of one document does train its tokenizer
        assert not list((tmp_path / "cache").glob("tokenizers/*.model"))


@pytest.mark.slow
def test_resume_after_a_sigkill_before_the_first_checkpoint_continues_its_folder(tmp_path, capsys):
    tiny = ["exp=quickstart", f"output_dir={tmp_path / 'outputs'}", f"data.cache_dir={tmp_path / 'cache'}",
            "model.num_layers=2", "model.hidden_size=64", "data.seq_length=64", "data.batch_size=4",
            "trainer.limit_val_batches=1", "data.num_workers=0"]
    process = start([*tiny, "trainer.max_steps=1000", "trainer.val_check_interval=1000"])
    id_file = wait_for(lambda: next((tmp_path / "outputs" / "quickstart").glob("*/mlflow_run_id"), None),
                       process, "the MLflow run")
    killed_id = wait_for(lambda: id_file.read_text().strip(), process, "the run id")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=HANG_S)
    run_dir = id_file.parent
    assert client(tmp_path).get_run(killed_id).info.status == "RUNNING"  # what SIGKILL leaves
    assert not list(run_dir.glob("checkpoints/*.ckpt"))

    assert main([*tiny, "resume=auto", "trainer.max_steps=1", "trainer.val_check_interval=1"]) == 0
    out, err = capsys.readouterr()
    assert (f"resume=auto: {run_dir} has no checkpoint (it stopped before its first one); starting it again "
            "from step 0") in out.splitlines()
    assert (f"note: MLflow run {killed_id} ({run_dir.name}) was left RUNNING by process {process.pid}, "
            "which is gone; marked KILLED") in err.splitlines()
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # no new run folder
    statuses = {run.info.run_id: run.info.status for run in runs(tmp_path, "quickstart")}
    new_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert statuses == {killed_id: "KILLED", new_id: "FINISHED"}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, sentencepiece_model, tokenizer) -> Path:
    """A tiny checkpoint (64 positions) laid out as a pretraining run, beside its tokenizer."""
    from glm_lightning.checkpoint import save_ours
    from glm_lightning.model import GLMConfig, GLMModel

    run = tmp_path_factory.mktemp("small_run")
    (run / "tokenizer.model").write_bytes(Path(sentencepiece_model).read_bytes())
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64))
    save_ours(model, run / "checkpoints" / "last.ckpt")
    return run


UNCLEAR = ["truncated .gz", "truncated .zst", "plain text named .gz", "prompt too long",
           "damaged mlflow_run_id", "garbage .safetensors", "zero devices", "GPU without a GPU",
           "negative seed", "hidden size not divisible by heads", "full disk while writing shards",
           "truncated shard", "damaged shard index"]


@pytest.mark.slow
@pytest.mark.parametrize("case", UNCLEAR)
def test_bad_input_and_impossible_settings_are_one_line_naming_the_file_or_key(
        tmp_path, capsys, make_text, sentencepiece_model, small_run, case):
    import gzip

    import zstandard
    from omegaconf import OmegaConf

    from experiments.tracking import mlflow_logger

    if case == "GPU without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    text = make_text(40).encode()
    cache, corpus = tmp_path / "cache", tmp_path / "corpus.txt"
    corpus.write_bytes(text)
    prepare = ["exp=prepare_data", f"tokenizer.path={sentencepiece_model}", f"data.cache_dir={cache}",
               "data.num_proc=1"]
    generate = ["exp=generate", f"model.init_from={small_run / 'checkpoints' / 'last.ckpt'}",
                'prompts=["a [MASK]"]', f"output_dir={tmp_path}"]
    files = {"truncated .gz": ("c.txt.gz", gzip.compress(text)[:-40]),
             "truncated .zst": ("c.txt.zst", zstandard.ZstdCompressor().compress(text)[:-40]),
             "plain text named .gz": ("c.txt.gz", text),
             "garbage .safetensors": ("model.safetensors", b"not a safetensors file" * 10)}
    named = tmp_path / files[case][0] if case in files else corpus
    if case in files:
        named.write_bytes(files[case][1])
    if case in ("truncated shard", "damaged shard index"):  # a cache written before, then damaged
        assert main([*prepare, f"data.train_files=[{corpus}]"]) == 0
        part = next(cache.glob("*.0.tokens" if case == "truncated shard" else "*.0.offsets.npy"))
        part.write_bytes(part.read_bytes()[: -7 if case == "truncated shard" else 40])
        named = part
        capsys.readouterr()
    arguments = {
        "truncated .gz": [*prepare, f"data.train_files=[{named}]"],
        "truncated .zst": [*prepare, f"data.train_files=[{named}]"],
        "plain text named .gz": [*prepare, f"data.train_files=[{named}]"],
        "prompt too long": [*generate[:2], f'prompts=["{" ".join(["word"] * 80)} [MASK]"]', generate[3]],
        "garbage .safetensors": [*generate, f"model.init_from={named}",
                                 f"tokenizer.path={sentencepiece_model}"],
        "zero devices": ["exp=quickstart", "trainer.devices=0"],
        "GPU without a GPU": [*generate, "trainer.accelerator=gpu"],
        "negative seed": ["exp=quickstart", "seed=-1"],
        "hidden size not divisible by heads": [
            "exp=quickstart", f"tokenizer.path={sentencepiece_model}", f"data.train_files=[{corpus}]",
            f"data.cache_dir={cache}", f"output_dir={tmp_path}", "model.hidden_size=65", "data.seq_length=64",
            "data.val_fraction=0", "logging.enabled=false"],
        "truncated shard": [*prepare, f"data.train_files=[{corpus}]"],
        "damaged shard index": [*prepare, f"data.train_files=[{corpus}]"],
    }
    expected = {
        "truncated .gz": f"error: {named}: damaged or truncated .gz data at byte offset ",
        "truncated .zst": f"error: {named}: damaged or truncated .zst data at byte offset ",
        "plain text named .gz": f"error: {named}: not .gz data (its first bytes are not the .gz signature)",
        "prompt too long": "error: prompts[0]: ",
        "damaged mlflow_run_id": f"{tmp_path / 'mlflow_run_id'} does not hold an MLflow run id",
        "garbage .safetensors": f"error: model.init_from: {named} is not a readable .safetensors file",
        "zero devices": "error: invalid value 0 for 'trainer.devices'",
        "GPU without a GPU": "error: invalid value 'gpu' for 'trainer.accelerator': this machine has no GPU",
        "negative seed": "error: argument 'seed=-1': invalid value -1 for 'seed': must not be negative",
        "hidden size not divisible by heads": "error: invalid model settings (model.* over the tiny preset): "
                                              "hidden_size (65) must be divisible by num_attention_heads (4)",
        "full disk while writing shards": f"error: No space left on device while writing {cache} (the token "
                                          f"cache, tokenizing {corpus}); the files written before are intact "
                                          "(free space, then run the same command again)",
        "truncated shard": f"warning: cached shard {named} of corpus.txt is incomplete",
        "damaged shard index": f"warning: cached shard {named.parent / named.name.split('.')[0]}.json of "
                               "corpus.txt has an unreadable index",
    }[case]
    if case == "damaged mlflow_run_id":
        (tmp_path / "mlflow_run_id").write_bytes(b"\x00\x17garbage")
        cfg = OmegaConf.create({"output_dir": str(tmp_path), "exp": "x", "logging": {
            "experiment_name": None, "tracking_uri": None, "tags": {}, "parent_run_id": None}})
        with pytest.raises(ConfigError) as raised:
            mlflow_logger(cfg, tmp_path, resume=True)
        lines = [str(raised.value)]
    elif case == "full disk while writing shards":
        faults = os.pathsep.join([str(ROOT / "tests" / "fault_injection"), str(ROOT)])
        env = {**os.environ, "PYTHONPATH": faults, "GLM_FAULT_ENOSPC_AFTER": "2000",
               "GLM_FAULT_ENOSPC_DIRS": str(cache)}
        command = [sys.executable, "-m", "experiments.run", *prepare, f"data.train_files=[{corpus}]"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_S)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "warning"))]
    else:
        code = main(arguments[case])
        err = capsys.readouterr().err
        assert "Traceback" not in err and code == (0 if case.endswith(("shard", "index")) else code)
        lines = [line for line in err.splitlines() if line.startswith(("error", "warning"))]
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_sigkill_of_prepare_data_ends_its_workers_and_the_next_run_removes_their_files(
        tmp_path, capsys, make_text, sentencepiece_model):
    big, small, cache = tmp_path / "big.txt", tmp_path / "small.txt", tmp_path / "cache"
    paragraph = make_text(40)
    # 24 MB: several parts tokenized by 2 workers for seconds (below 8 MB one process does it all)
    big.write_text("\f".join([paragraph] * (24_000_000 // len(paragraph) + 1)), encoding="utf-8")
    small.write_text(paragraph, encoding="utf-8")
    prepare = ["exp=prepare_data", f"tokenizer.path={sentencepiece_model}", f"data.cache_dir={cache}",
               "data.num_proc=2"]
    process = start([*prepare, f"data.train_files=[{big}]"])
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")

    def workers() -> list[int]:  # the two workers and multiprocessing's resource tracker
        pids = [int(pid) for pid in children.read_text().split()]
        return pids if len(pids) >= 3 and list(cache.glob(".*.tmp")) else []

    pids = wait_for(workers, process, "workers writing shard parts")
    os.kill(process.pid, signal.SIGKILL)  # the parent only, as an out-of-memory killer would
    process.wait(timeout=HANG_S)
    deadline = time.time() + 30
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)], "child processes outlived their parent"
    left = list(cache.glob(".*.tmp"))
    assert left  # what the killed run left

    assert main([*prepare, f"data.train_files=[{small}]"]) == 0
    assert (f"note: removed {len(left)} temporary files left in {cache} by killed tokenizations"
            in capsys.readouterr().err.splitlines())
    assert not list(cache.glob(".*.tmp"))


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``signum`` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")
def test_sigterm_while_the_command_line_starts_is_one_stopped_line(tmp_path):
    process = start(["exp=quickstart", f"output_dir={tmp_path}"])
    wait_for(lambda: catches(process.pid, signal.SIGTERM), process, "the start-up handler")
    process.send_signal(signal.SIGTERM)  # while Python imports the libraries, before any job runs
    stderr = finish(process)
    assert process.returncode == 130
    assert stopped_line(stderr) == ("stopped: terminated by SIGTERM during start-up (nothing was written)")
    assert not (tmp_path / "quickstart").exists()
