"""The lm-evaluation-harness backend against the project's own scoring (LM scoring, exp=lm_eval,
exp=generate) on a random tiny checkpoint, and exp=harness end to end with MLflow."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import runpy
import shlex
import sys

import mlflow
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[harness]')")

from lm_eval.api.instance import Instance  # noqa: E402
from readme_commands import README, readme_command  # noqa: E402

from experiments.config import load_config  # noqa: E402
from experiments.harness_tasks.utils import (  # noqa: E402
    copa_choices,
    copa_context,
    copa_dataset,
    lambada_answer,
    lambada_context,
)
from experiments.jobs import generate as generate_job  # noqa: E402
from experiments.run import main  # noqa: E402
from glm_lightning.checkpoint import export_hf  # noqa: E402
from glm_lightning.harness import GLMHarnessLM  # noqa: E402
from glm_lightning.lm_eval import lambada_sample, score_samples  # noqa: E402
from glm_lightning.model import GLMConfig, GLMModel  # noqa: E402

WORDS = "the curious student reads a story about an ancient river while the teacher crosses a bridge".split()
PROMPTS = ["The curious student reads", "A famous doctor visits the quiet village and", "Rivers"]


@pytest.fixture(scope="module")
def backend(run_dir) -> GLMHarnessLM:
    """Loaded as the harness loads it: from model_args strings, the run's tokenizer found beside."""
    return GLMHarnessLM(pretrained=str(run_dir / "checkpoints" / "last.ckpt"), batch_size="8", device="cpu",
                        max_length=32, stride=8, max_gen_toks=6)


def copa_docs(n: int) -> list[dict]:
    docs = []
    for i in range(n):
        w = WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)]
        docs.append({"premise": f"The {w[0]} {w[1]} {w[2]}.", "choice1": f"The {w[3]} {w[4]}.",
                     "choice2": f"A {w[5]} {w[6]} {w[7]}.", "question": ("cause", "effect")[i % 2],
                     "label": i % 2, "idx": i})
    return docs


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_equals_the_projects_lm_scoring_on_20_multiple_choice_examples(backend, tokenizer):
    pairs = [(copa_context(doc), choice) for doc in copa_docs(20) for choice in copa_choices(doc)]
    got = backend.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)
    # the project's LM scoring (exp=lm_eval's LAMBADA layout), one sample at a time
    samples = [lambada_sample(tokenizer.encode(c), tokenizer.encode(x), tokenizer) for c, x in pairs]
    expected = score_samples(backend.model, samples, batch_size=1)
    assert len(got) == 40
    for (loglik, greedy), score in zip(got, expected, strict=True):
        assert loglik == pytest.approx(-score.loss, abs=1e-5)
        assert greedy == score.all_correct
    # and one request by hand: a full forward pass, log-softmax at the continuation's positions
    context, continuation = pairs[0]
    c, x = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = [tokenizer.cls_id, *c, tokenizer.mask_id, tokenizer.eos_id, tokenizer.sop_id, *x[:-1]]
    sep = len(c) + 3
    positions = torch.tensor([[*range(sep), *[len(c) + 1] * len(x)], [0] * sep + list(range(1, len(x) + 1))])
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids]), positions[None], torch.tensor([sep]))[0]
    by_hand = F.log_softmax(logits[sep:].float(), dim=-1)  # rows from [sop] on predict x
    by_hand = by_hand[torch.arange(len(x)), torch.tensor(x)].sum().item()
    assert got[0][0] == pytest.approx(by_hand, abs=1e-5)


def test_trailing_context_whitespace_moves_to_the_continuation(backend):
    a = backend.pair_sample("The student reads ", "the story")
    b = backend.pair_sample("The student reads", " the story")
    assert all((a[k] == b[k]).all() for k in ("input_ids", "position_ids", "target_ids", "loss_mask"))


def test_loglikelihood_rolling_equals_exp_lm_eval(backend, run_dir, tmp_path, make_text):
    text = make_text(5, seed=4)
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(text.split("\n")) + "\n", encoding="utf-8")  # blank lines between documents
    assert main(["exp=lm_eval", f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}",
                 f"lm_eval.file={path}", "lm_eval.protocol=language_model", "lm_eval.max_length=32",
                 "lm_eval.stride=8",
                 f"output_dir={tmp_path}", "run_name=ref", "logging.enabled=false"]) == 0
    reference = json.loads((tmp_path / "lm_eval" / "ref" / "metrics.json").read_text())
    documents = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    got = backend.loglikelihood_rolling([request("loglikelihood_rolling", d) for d in documents],
                                        disable_tqdm=True)
    assert -sum(got) == pytest.approx(reference["perplexity/nll"], rel=1e-6)
    scores = backend.rolling_scores(documents, disable_tqdm=True)
    assert sum(s.num_tokens for s in scores) == reference["perplexity/num_tokens"]
    assert sum(s.num_predicted for s in scores) == reference["perplexity/num_predicted"]
    assert [-s.nll for s in scores] == pytest.approx(got, abs=0)


def test_generate_until_equals_exp_generate(backend, run_dir, tokenizer):
    cfg = load_config("generate", [f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}",
                                   "generation.max_new_tokens=6", "trainer.accelerator=cpu",
                                   "prompts=[" + ",".join(json.dumps(p) for p in PROMPTS) + "]"])
    filled = generate_job.run(cfg)  # one prompt at a time; the backend decodes them in one padded batch
    ids = backend.generate_ids(PROMPTS, 6)
    for prompt, text, generated in zip(PROMPTS, filled, ids, strict=True):
        assert tokenizer.decode(tokenizer.encode(prompt) + generated) == text
    kwargs = {"until": [], "max_gen_toks": 6, "do_sample": False}
    texts = backend.generate_until([request("generate_until", p, kwargs) for p in PROMPTS], disable_tqdm=True)
    assert texts == [tokenizer.decode(g) for g in ids]
    # a stop sequence cuts the text before its first occurrence; max_gen_toks bounds the tokens
    stop = texts[0][len(texts[0]) // 2:][:2]
    stopped = request("generate_until", PROMPTS[0], {"until": [stop], "max_gen_toks": 6})
    cut = backend.generate_until([stopped], disable_tqdm=True)[0]
    assert cut == texts[0].split(stop, 1)[0] and len(cut) < len(texts[0])
    assert backend.generate_ids(PROMPTS[:1], 2)[0] == ids[0][:2]


def test_exp_harness_runs_the_three_local_tasks_and_logs_to_mlflow(run_dir, tokenizer, tmp_path, make_text,
                                                                   monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not the user's cache
    torch.manual_seed(0)  # a Hugging Face export: model.init_from takes the folder and its tokenizer
    export_hf(GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64)),
              tmp_path / "hf", tokenizer=tokenizer)
    copa = tmp_path / "copa.jsonl"
    copa.write_text("".join(json.dumps(doc) + "\n" for doc in copa_docs(6)), encoding="utf-8")
    text = tmp_path / "text.txt"
    text.write_text(make_text(2, seed=5) + "\n\n", encoding="utf-8")
    lambada = tmp_path / "lambada.jsonl"
    passages = [" ".join(WORDS[i:i + 6]) for i in range(4)]
    lambada.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["exp=harness", f"model.init_from={tmp_path / 'hf'}", f"harness.data_files.glm_copa={copa}",
                 f"harness.data_files.glm_perplexity={text}", f"harness.data_files.glm_lambada={lambada}",
                 "harness.bootstrap_iters=0", "lm_eval.max_length=32", "lm_eval.stride=8",
                 f"output_dir={out}", "run_name=h1"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["harness"], output_format="list")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert {"harness/glm_copa/acc", "harness/glm_copa/acc_norm", "harness/glm_perplexity/word_perplexity",
            "harness/glm_perplexity/bits_per_byte", "harness/glm_lambada/acc",
            "harness/glm_lambada/perplexity"} <= set(m)
    assert m["harness/glm_copa/acc"] in {k / 6 for k in range(7)}
    # the logged numbers are the backend's: recompute two of them from the same folder
    lm = GLMHarnessLM(pretrained=str(tmp_path / "hf"), device="cpu", max_length=32, stride=8)
    documents = [line.strip() for line in text.read_text().splitlines() if line.strip()]
    nll = sum(s.nll for s in lm.rolling_scores(documents, disable_tqdm=True))
    words = sum(len(re.split(r"\s+", d)) for d in documents)
    assert m["harness/glm_perplexity/word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    lls = [ll for ll, _ in lm.loglikelihood([request("loglikelihood", lambada_context({"text": p}),
                                                     lambada_answer({"text": p})) for p in passages], True)]
    assert m["harness/glm_lambada/perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-5)
    results = json.loads((out / "harness" / "h1" / "results.json").read_text())
    assert results["results"]["glm_copa"]["sample_len"] == 6


@pytest.mark.parametrize("args, message", [
    (["harness.tasks=[glm_lambada]"], "error: glm_lambada.yaml (data_files): "),
    (["harness.tasks=[glm_copa]", "harness.data_files.glm_lambada=x.jsonl"],
     "error: harness.data_files names glm_lambada, which harness.tasks does not run"),
    (["harness.tasks=[no_such_task]"], "error: harness.tasks: no task no_such_task (local tasks: glm_copa, "),
])
def test_exp_harness_usage_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    code = main(["exp=harness", f"model.init_from={run_dir / 'checkpoints' / 'last.ckpt'}", *args,
                 f"output_dir={tmp_path}"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith(message)


def test_dtype_runs_the_checkpoint_in_that_precision(run_dir, backend, tokenizer):
    lm = GLMHarnessLM(pretrained=str(run_dir / "checkpoints" / "last.ckpt"), device="cpu", dtype="bfloat16",
                      max_length=32, stride=8)
    assert lm.model.word_embeddings.weight.dtype == torch.bfloat16
    assert backend.model.word_embeddings.weight.dtype == torch.float32  # dtype=auto: as stored
    pairs = [(copa_context(doc), choice) for doc in copa_docs(4) for choice in copa_choices(doc)]
    requests = [request("loglikelihood", *pair) for pair in pairs]
    low, full = lm.loglikelihood(requests, True), backend.loglikelihood(requests, True)
    assert [ll for ll, _ in low] == pytest.approx([ll for ll, _ in full], rel=0.05)
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, bfloat16, float16"):
        GLMHarnessLM(pretrained=str(run_dir / "checkpoints" / "last.ckpt"), device="cpu", dtype="int8")


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(run_dir, tmp_path, sentencepiece_model):
    from glm_lightning.checkpoint import TokenizerRecord, _write_ours, read_checkpoint

    stored = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    _write_ours(stored.weights, GLMConfig(**stored.config), tmp_path / "other.ckpt",
                TokenizerRecord("0" * 64, "sentencepiece /elsewhere/tokenizer.model"))
    with pytest.raises(ValueError, match="was trained with another tokenizer .sentencepiece /elsewhere/"):
        GLMHarnessLM(pretrained=str(tmp_path / "other.ckpt"), tokenizer=sentencepiece_model, device="cpu")


@pytest.mark.slow  # the harness's command line indexes its ~14,000 built-in task files (~15 s)
def test_the_readme_harness_command_prints_the_backends_copa_accuracy(run_dir, backend, tmp_path, monkeypatch,
                                                                      capsys):
    """The README's ``python -m glm_lightning.harness`` line as written, in this process (lm_eval is
    imported already), from a working directory laid out as the README assumes: the run's checkpoint
    under outputs/quickstart/<run>/, the task folder at experiments/harness_tasks, COPA where
    ``--metadata glm_copa=`` points."""
    import datasets
    import lm_eval.utils

    command = readme_command("python -m glm_lightning.harness ")
    docs = copa_docs(8)
    (tmp_path / "superglue" / "COPA").mkdir(parents=True)
    (tmp_path / "superglue" / "COPA" / "val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "outputs" / "quickstart").mkdir(parents=True)
    os.symlink(run_dir, tmp_path / "outputs" / "quickstart" / "r1")
    (tmp_path / "experiments").mkdir()
    os.symlink(README.parent / "experiments" / "harness_tasks", tmp_path / "experiments" / "harness_tasks")
    argv = shlex.split(command.replace("<run>", "r1").replace("/data/superglue", str(tmp_path / "superglue")))
    assert argv[:3] == ["python", "-m", "glm_lightning.harness"] and "--metadata" in argv
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["glm_lightning.harness", *argv[3:]])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not the user's cache
    # the command line configures lm_eval's logger (a handler on this test's captured stderr): undone after
    logger = logging.getLogger("lm_eval")
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", lm_eval.utils._LOGGING_CONFIGURED)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    level = logger.level
    try:
        runpy.run_module("glm_lightning.harness", run_name="__main__")
    finally:
        logger.setLevel(level)
    table = capsys.readouterr().out
    rows = {cells[4]: cells for line in table.splitlines()
            if len(cells := [c.strip() for c in line.strip("|").split("|")]) > 6}
    # the backend's own scores of the same documents: the higher log-likelihood wins
    pairs = [(copa_context(doc), choice) for doc in docs for choice in copa_choices(doc)]
    lls = [ll for ll, _ in backend.loglikelihood([request("loglikelihood", *pair) for pair in pairs], True)]
    acc = sum((lls[2 * i + 1] > lls[2 * i]) == doc["label"] for i, doc in enumerate(docs)) / len(docs)
    norm = [ll / len(choice.encode()) for ll, (_, choice) in zip(lls, pairs, strict=True)]
    acc_norm = sum((norm[2 * i + 1] > norm[2 * i]) == doc["label"] for i, doc in enumerate(docs)) / len(docs)
    assert rows["acc"][0] == "glm_copa" and float(rows["acc"][6]) == pytest.approx(acc, abs=5e-5)
    assert float(rows["acc_norm"][6]) == pytest.approx(acc_norm, abs=5e-5)


def test_a_missing_task_file_is_named_with_the_metadata_key_that_sets_it(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"^glm_copa: no file {missing} \(--metadata glm_copa=PATH"):
        copa_dataset({"validation": "../shared/data/superglue/COPA/val.jsonl"}, glm_copa=str(missing),
                     version=1.0, pretrained="last.ckpt")
