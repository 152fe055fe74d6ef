"""The released zero-shot LM protocols (`tasks/language_model/`, `config_tasks/zero_*.sh`): WikiText
detokenization, the word count of the adjusted perplexity, lines as documents, the released window,
blank lines, jsonl input, and what the job prints and logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from experiments.run import main
from glm_lightning.checkpoint import save_ours
from glm_lightning.detokenize import wikitext_detokenize
from glm_lightning.lm_eval import (
    PROTOCOLS,
    count_words,
    default_window,
    evaluate_lambada,
    evaluate_perplexity,
    perplexities,
    perplexity_windows,
    read_documents,
    read_jsonl_texts,
)
from glm_lightning.model import GLMConfig, GLMModel

# One example per rule of `tasks/language_model/detokenizer.py`, in its order.
RULES = [
    ("the players ' union", "the players' union"),  # plural possessive
    ("a well @-@ known 1 @,@ 000 @.@ 5 km", "a well-known 1,000.5 km"),  # number separators
    ("a : b ; c . d ! e ? f , g", "a: b; c. d! e? f, g"),  # no space before punctuation
    ("born ( 1 May 1990 ) in", "born (1 May 1990) in"),  # brackets lose their inner spaces
    ("see [ 3 ] and { x }", "see [3] and {x}"),
    ('as " Craig " in', 'as "Craig" in'),  # quotes pair up left to right
    ("the ' Bill ' show", "the 'Bill' show"),
    ("( a ( b ) c )", "(a ( b) c )"),  # an opening pairs with the first closing after it
    ("= = = = Deep = = = =", "==== Deep ===="),  # heading markers
    ("= = = Sub = = =", "=== Sub ==="),
    ("= = Career = =", "== Career =="),
    ("at 20 \N{DEGREE SIGN} C", "at 20\N{DEGREE SIGN}C"),
    ("end . \n next line", "end.\nnext line"),  # no space at either end of a line
    ("there were N people", "there were 1 people"),  # the number placeholder
    ("Teddy 's Story", "Teddy's Story"),  # possessive
]


@pytest.mark.parametrize("raw, expected", RULES)
def test_wikitext_detokenizer_rules(raw, expected):
    assert wikitext_detokenize(raw) == expected


def test_wikitext_lines_detokenized_with_blank_lines():
    raw = (" \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . "
           "He had a guest @-@ starring role in \" The Bill \" in 2000 . \n \n\n = = Career = = \n")
    assert wikitext_detokenize(raw) == (
        "\n= Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. "
        "He had a guest-starring role in \"The Bill\" in 2000.\n\n\n== Career ==\n")
    assert wikitext_detokenize("") == "" and wikitext_detokenize("\n\n \n") == "\n\n\n"


def test_word_count_keeps_newlines_inside_words():
    text = " = Title = \n \n First line , here . \nSecond  line\n"
    # "\n" alone, "\nSecond" and the empty word of the double space each count.
    assert count_words(text) == len(text.strip().split(" ")) == 13
    assert len(text.split()) == 10  # whitespace words: a different count


@pytest.fixture(scope="module")
def model(tokenizer) -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=64)).eval()


WIKI = (" = The River = \n \n The river ( about 20 @,@ 000 km ) crosses the ancient city . \n"
        " The teacher 's story of the river is \" wonderful \" . \n \n")


def test_wikitext_protocol_counts_raw_words_and_scores_detokenized_tokens(model, tokenizer):
    result = evaluate_perplexity(model, tokenizer, WIKI, detokenize=wikitext_detokenize, max_length=16,
                                 stride=4)
    assert result["num_words"] == len(WIKI.strip().split(" ")) == 33
    assert result["num_tokens"] == len(tokenizer.encode(wikitext_detokenize(WIKI)))
    assert result["num_tokens"] != len(tokenizer.encode(WIKI))
    assert result["num_documents"] == 1 and result["num_predicted"] == result["num_tokens"] - 1
    assert result["adjusted_ppl"] == pytest.approx(math.exp(result["nll"] / (33 - 1)))


LINES = ["The curious student reads a story about the ancient river.",
         "The teacher answers quickly while the painter crosses the narrow bridge and the famous doctor "
         "visits the quiet village in the morning.",
         "A bridge."]


def test_lines_as_documents_give_one_window_set_per_line(model, tokenizer):
    together = evaluate_perplexity(model, tokenizer, LINES, max_length=12, stride=5)
    alone = [evaluate_perplexity(model, tokenizer, line, max_length=12, stride=5) for line in LINES]
    windows = [perplexity_windows(tokenizer.encode(line), tokenizer, max_length=12, stride=5)
               for line in LINES]
    assert [len(w) for w in windows] == [r["num_windows"] for r in alone]
    assert [len(w) for w in windows][1] > 1  # the long line spans several windows
    assert together["num_windows"] == sum(len(w) for w in windows)
    assert together["num_documents"] == 3
    assert together["num_tokens"] == sum(r["num_tokens"] for r in alone)
    assert together["num_predicted"] == together["num_tokens"] - 3  # no window crosses a line
    assert together["num_words"] == sum(len(line.split(" ")) for line in LINES)
    assert together["nll"] == pytest.approx(sum(r["nll"] for r in alone), rel=1e-6)
    # Each document's first token and word are context: the denominators leave them out.
    assert together["ppl"] == pytest.approx(math.exp(together["nll"] / (together["num_tokens"] - 3)))
    assert perplexities(6.0, 5, 4, num_documents=2) == pytest.approx((math.exp(2.0), math.exp(3.0)))


def test_blank_lines_are_not_documents(model, tokenizer, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(f"\n{LINES[0]}\n\n   \n{LINES[1]}  \n\t\n{LINES[2]}\n\n", encoding="utf-8")
    assert read_documents(path, "lines") == LINES
    documents = read_documents(path, "lines")
    with_blanks = evaluate_perplexity(model, tokenizer, documents, max_length=12, stride=5)
    without = evaluate_perplexity(model, tokenizer, LINES, max_length=12, stride=5)
    assert with_blanks == without
    # The stream of a file with blank lines is one document; a blank file has nothing to predict.
    assert read_documents(path, "stream") == [path.read_text(encoding="utf-8")]
    with pytest.raises(ValueError, match="at least two words"):
        evaluate_perplexity(model, tokenizer, ["", "  ", "\n"], max_length=12)


def test_stream_keeps_carriage_returns_as_the_released_reader(tmp_path):
    path = tmp_path / "wiki.raw"
    path.write_bytes(b" = A = \r\n \r\n B , c . \r\n")
    assert read_documents(path, "stream") == [" = A = \r\n \r\n B , c . \r\n"]
    assert read_documents(path, "lines") == ["= A =", "B , c ."]


def test_jsonl_documents_are_their_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": line, "id": i}) for i, line in enumerate(LINES)) + "\n\n",
                    encoding="utf-8")
    assert read_documents(path, "lines") == LINES
    assert read_documents(path, "stream") == ["\n".join(LINES)]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["text"]', "expected a JSON object with a string 'text' field"),
    ('{"body": "no text"}', "expected a JSON object with a string 'text' field"),
    ('{"text": 5}', "expected a JSON object with a string 'text' field"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "fine"}}\n\n{line}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:3: {message}"):
        read_jsonl_texts(path)


def tiny_model(tokenizer, positions: int) -> GLMModel:
    torch.manual_seed(0)
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), max_sequence_length=positions,
                                 num_layers=1, hidden_size=32, num_attention_heads=2)
    return GLMModel(config).eval()


def test_released_window_is_the_default(tokenizer, make_text):
    assert default_window(tiny_model(tokenizer, 512)) == 511
    # A model with more positions still gets the released window (not its own length minus one).
    model = tiny_model(tokenizer, 1024)
    text = make_text(30, seed=5)
    n = len(tokenizer.encode(text))
    assert n > 1100
    result = evaluate_perplexity(model, tokenizer, text, batch_size=16)
    assert (result["window"], result["stride"]) == (511, 256)
    assert result["num_windows"] == math.ceil((n - 511) / 256) + 1
    assert result["num_predicted"] == n - 1
    # A model with fewer positions: the window shrinks to them, and the stride to the window.
    small = tiny_model(tokenizer, 64)
    assert default_window(small) == 63
    short = evaluate_perplexity(small, tokenizer, LINES[1])
    assert (short["window"], short["stride"]) == (63, 63)


def test_lambada_default_sample_is_the_released_512(tokenizer):
    model = tiny_model(tokenizer, 1024)
    long_passage = " ".join(["the river crosses the ancient city"] * 120) + " bridge"
    assert len(tokenizer.encode(long_passage)) > 512
    default = evaluate_lambada(model, tokenizer, [long_passage])
    explicit = evaluate_lambada(model, tokenizer, [long_passage], max_length=512)
    assert default == explicit


def test_protocols_follow_the_released_scripts():
    assert {name: (p.task, p.documents, p.detokenize, p.script) for name, p in PROTOCOLS.items()} == {
        "wikitext": ("perplexity", "stream", wikitext_detokenize, "config_tasks/zero_wikitext.sh"),
        "language_model": ("perplexity", "lines", None, "config_tasks/zero_lm.sh"),
        "lambada": ("lambada", "lines", None, "config_tasks/zero_lambada.sh"),
    }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, sentencepiece_model) -> Path:
    run = tmp_path_factory.mktemp("lm_run")
    (run / "tokenizer.model").write_bytes(Path(sentencepiece_model).read_bytes())
    save_ours(model, run / "checkpoints" / "last.ckpt")
    return run / "checkpoints" / "last.ckpt"


def lm_eval(checkpoint: Path, tmp_path: Path, *overrides: str) -> int:
    return main(["exp=lm_eval", f"model.init_from={checkpoint}", f"output_dir={tmp_path / 'out'}",
                 "trainer.accelerator=cpu", *overrides])


def printed_metrics(stdout: str, task: str = "perplexity") -> dict[str, float]:
    return {name: float(value) for name, value in
            (line.split(": ", 1) for line in stdout.splitlines() if line.startswith(f"{task}/"))}


@pytest.mark.slow  # creating the MLflow database
def test_job_records_protocol_window_and_counts(checkpoint, tmp_path, capsys):
    path = tmp_path / "wiki.test.raw"
    path.write_text(WIKI * 3, encoding="utf-8")
    assert lm_eval(checkpoint, tmp_path, f"lm_eval.file={path}", "lm_eval.stride=8") == 0
    out = capsys.readouterr().out
    job_lines = out[out.index("protocol wikitext"):].splitlines()
    assert job_lines[0] == ("protocol wikitext (config_tasks/zero_wikitext.sh): the file as one document, "
                            'WikiText detokenizer, words = len(text.split(" ")), windows of 63 tokens, '
                            "stride 8, bidirectional")
    metrics = printed_metrics(out)
    assert metrics["perplexity/window"] == 63 and metrics["perplexity/stride"] == 8
    assert metrics["perplexity/num_words"] == len((WIKI * 3).strip().split(" "))
    result = next(line for line in job_lines if line.startswith("perplexity (wikitext): "))
    assert (f"window 63, stride 8, {metrics['perplexity/num_tokens']:.0f} tokens, "
            f"{metrics['perplexity/num_words']:.0f} words, 1 document, bidirectional") in result

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["lm_eval"], output_format="list")
    assert run.data.params["lm_eval.protocol"] == "wikitext"
    assert run.data.params["lm_eval.resolved.documents"] == "stream"
    assert run.data.params["lm_eval.resolved.script"] == "config_tasks/zero_wikitext.sh"
    for name in ("window", "stride", "num_tokens", "num_words", "adjusted_ppl"):
        logged, printed = run.data.metrics[f"perplexity/{name}"], metrics[f"perplexity/{name}"]
        assert logged == pytest.approx(printed, rel=1e-5)


def test_job_reads_jsonl_by_its_text_field(checkpoint, tmp_path, capsys):
    text, jsonl = tmp_path / "docs.txt", tmp_path / "docs.jsonl"
    text.write_text("\n".join(LINES), encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES), encoding="utf-8")
    for protocol in ("language_model", "wikitext"):
        results = []
        for path in (text, jsonl):
            assert lm_eval(checkpoint, tmp_path, f"lm_eval.file={path}", f"lm_eval.protocol={protocol}",
                           "logging.enabled=false", "lm_eval.max_length=12", "lm_eval.stride=5") == 0
            results.append(printed_metrics(capsys.readouterr().out))
        assert results[0] == results[1]


def test_job_malformed_jsonl_is_one_line_naming_file_and_line(checkpoint, tmp_path, capsys):
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"text": "The teacher crosses the bridge"}\n{"text": oops}\n', encoding="utf-8")
    for protocol in ("lambada", "wikitext"):
        assert lm_eval(checkpoint, tmp_path, f"lm_eval.file={path}", f"lm_eval.protocol={protocol}",
                       "logging.enabled=false") == 2
        err = capsys.readouterr().err
        assert err == f"error: lm_eval.file {path}:2: not valid JSON (Expecting value)\n"
