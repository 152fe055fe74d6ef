"""experiments.inputs: every missing input of a job reported at once, before the settings and start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from timeouts import HANG_S

from datamodules.superglue import split_path
from experiments.config import load_config
from experiments.inputs import checkpoint_settings, loads_tokenizer, missing_inputs, split_file
from experiments.run import main
from glm_lightning.checkpoint import save_ours
from glm_lightning.model import GLMConfig, GLMModel

ROOT = Path(__file__).resolve().parents[1]


def test_every_missing_path_is_one_line_before_the_settings(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    files = f"[{corpus},{tmp_path / 'gone.txt'},{tmp_path / 'no' / '*.txt'}]"
    code = main(["exp=pretrain", f"data.train_files={files}",
                 f"data.val_files=[{tmp_path / 'val'}]", f"resume={tmp_path / 'old.ckpt'}",
                 f"tokenizer.path={tmp_path / 'spm.model'}", f"output_dir={tmp_path / 'out'}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # nothing printed, nothing started
    assert err.splitlines() == [
        f"error: resume: {tmp_path / 'old.ckpt'} does not exist",
        f"error: tokenizer.path: {tmp_path / 'spm.model'} does not exist",
        f"error: data.train_files: {tmp_path / 'gone.txt'} does not exist",
        f"error: data.train_files: {tmp_path / 'no' / '*.txt'} matches no files",
        f"error: data.val_files: {tmp_path / 'val'} does not exist",
    ]
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_them_in_a_second(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "experiments.run", "exp=lm_eval",
                             f"model.init_from={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                             f"lm_eval.file={tmp_path / 'wiki.txt'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: model.init_from: {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} does not exist",
        f"error: lm_eval.file: {tmp_path / 'wiki.txt'} does not exist"]
    assert "torch" not in subprocess.run(  # nothing heavy is imported to find them
        [sys.executable, "-c", "import sys, experiments.run; print(' '.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_S).stdout.split()
    assert time.monotonic() - started < 60  # seconds even on a busy machine, not the minute of a start-up


def test_superglue_splits_the_run_tokenizer_and_hub_ids(tmp_path):
    data, few = tmp_path / "superglue", tmp_path / "fewglue"
    for folder, split in ((data, "val"), (data, "train"), (few, "train")):
        (folder / "RTE").mkdir(parents=True, exist_ok=True)
        (folder / "RTE" / f"{split}.jsonl").write_text("")
    (data / "CB").mkdir()
    (data / "CB" / "train.jsonl").write_text("")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    cfg = load_config("superglue", [f"model.init_from={checkpoint}", f"data.superglue_dir={data}",
                                    f"data.fewglue_dir={few}", "task=[rte,cb]"])
    assert missing_inputs(cfg) == [
        f"tokenizer.path: not set, and the run of {checkpoint} has no tokenizer.model "
        f"({tmp_path / 'run' / 'tokenizer.model'})",
        f"data.fewglue_dir: {few / 'CB' / 'train.jsonl'} does not exist (CB needs its train split)",
        f"data.superglue_dir: {data / 'CB' / 'val.jsonl'} does not exist (CB needs its val split)"]
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"")
    cfg = load_config("generate", ["model.init_from=THUDM/glm-large", "tokenizer.kind=wordpiece",
                                   f"tokenizer.path={checkpoint}"])
    assert missing_inputs(cfg) == []  # a Hugging Face repo id is the job's to download


@pytest.mark.parametrize("task", ["BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC"])
def test_split_files_are_where_the_reader_looks(task, tmp_path):
    for split in ("train", "val"):
        assert split_file(tmp_path, task, split) == split_path(task, tmp_path, split)


def test_settings_show_the_checkpoints_model_and_tokenizer(tmp_path, capsys, tokenizer, sentencepiece_model):
    # generate, lm_eval and superglue take both from the checkpoint: the tokenizer's training settings
    # (tokenizer.vocab_size=8000 of base.yaml) are not what they use.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(sentencepiece_model, run / "tokenizer.model")
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64))
    save_ours(model, run / "checkpoints" / "last.ckpt")
    assert main(["exp=generate", f"model.init_from={run / 'checkpoints' / 'last.ckpt'}",
                 'prompts=["a [MASK]"]', "generation.max_new_tokens=1", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    settings = " ".join(out[:out.index("filled texts")].split())  # wrapped as the other settings
    assert "tokenizer.vocab_size" not in settings and "tokenizer.model_type" not in settings
    assert (f"model (from model.init_from, ours (Lightning checkpoint)): num_layers=2 hidden_size=64 "
            f"num_attention_heads=4 vocab_size={model.config.vocab_size} max_sequence_length=64 ") in settings
    beside = run / "tokenizer.model"
    assert f"tokenizer (the run's, beside the checkpoint): {beside} (500 pieces)" in settings
    cfg = load_config("pretrain", [f"model.init_from={run / 'checkpoints' / 'last.ckpt'}"])
    assert not loads_tokenizer(cfg) and checkpoint_settings(cfg) == []  # pretraining trains its tokenizer
