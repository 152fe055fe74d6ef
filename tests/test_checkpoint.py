"""GLM checkpoints: init_from files, official / Hugging Face / our layouts, conversion and the CLI."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from timeouts import HANG_S

from experiments.config import load_config
from experiments.jobs.pretrain import build_module
from glm_lightning.checkpoint import (
    export_hf,
    export_official,
    fix_chinese_gmask,
    infer_config,
    init_weights,
    load_glm,
    merge_model_parallel,
    read_checkpoint,
    read_state_dict,
    save_ours,
    split_model_parallel,
)
from glm_lightning.checkpoint import main as checkpoint_main
from glm_lightning.config import ConfigError
from glm_lightning.model import GLMConfig, GLMModel

CONFIG = GLMConfig.from_name("tiny", vocab_size=300)


def source_model() -> GLMModel:
    torch.manual_seed(1)
    return GLMModel(CONFIG)


def layouts(model: GLMModel) -> dict[str, object]:
    sd = model.state_dict()
    return {
        "plain": sd,
        "official": {"module": sd, "iteration": 7},
        "huggingface": {**{f"glm.{k}": v for k, v in sd.items()}, "glm.dense.weight": torch.ones(2)},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 3},
    }


@pytest.mark.parametrize("layout", ["plain", "official", "huggingface", "lightning"])
def test_init_weights_from_each_layout_reproduces_the_model(tmp_path, layout, caplog):
    source = source_model().eval()
    path = tmp_path / f"{layout}.pt"
    torch.save(layouts(source)[layout], path)
    torch.manual_seed(2)
    target = GLMModel(CONFIG).eval()
    with caplog.at_level(logging.WARNING):
        init_weights(target, path)
    ids = torch.randint(0, 300, (2, 9))
    pos = torch.stack([torch.arange(9), torch.zeros(9, dtype=torch.long)]).expand(2, 2, 9)
    sep = torch.tensor([5, 9])
    torch.testing.assert_close(target(ids, pos, sep), source(ids, pos, sep), atol=0, rtol=0)
    assert ("dense.weight" in caplog.text) == (layout == "huggingface")


def test_a_checkpoint_of_another_size_is_refused_with_the_key_and_shapes(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(GLMModel(GLMConfig.from_name("tiny", vocab_size=1000)).state_dict(), path)
    with pytest.raises(ValueError, match=r"word_embeddings.weight has shape \[1024, 64\] but the model needs "
                                         r"\[384, 64\]"):
        init_weights(GLMModel(CONFIG), path)
    sd = source_model().state_dict()
    del sd["transformer.final_layernorm.bias"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="lacks GLM weights"):
        init_weights(GLMModel(CONFIG), path)
    with pytest.raises(FileNotFoundError, match="checkpoint file"):
        read_state_dict(tmp_path)


def test_the_job_builds_its_model_from_init_from(tmp_path, tokenizer):
    path = tmp_path / "start.pt"
    torch.manual_seed(3)
    start = GLMModel(GLMConfig.from_name("tiny", vocab_size=len(tokenizer)))
    torch.save({"module": start.state_dict()}, path)
    module = build_module(load_config("quickstart", ["model.num_layers=2", "model.hidden_size=64",
                                                     f"model.init_from={path}"]), tokenizer)
    assert module.model.word_embeddings.weight.is_meta  # read once the Trainer sets the module up
    module.configure_model()
    for key, value in start.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="model.init_from: .* lacks GLM weights"):
        build_module(load_config("quickstart", ["model.num_layers=4", "model.hidden_size=64",
                                                f"model.init_from={path}"]), tokenizer)


# Conversion between the official, Hugging Face and our layouts (official `model/modeling_glm.py` keys).

HEADS = CONFIG.num_attention_heads  # 4: not hidden_size // 64, so the tests must pass it


def logits(model: GLMModel) -> torch.Tensor:
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (2, 9))
    pos = torch.stack([torch.arange(9), torch.zeros(9, dtype=torch.long)]).expand(2, 2, 9)
    return model.eval()(ids, pos, torch.tensor([5, 9]))


def strided_split(sd: dict, ranks: int) -> list[dict]:
    """The official model-parallel slicing, written out independently of the code under test:
    rank r holds [Q_r; K_r; V_r] of the QKV projection, vocab rows and dense_h_to_4h rows,
    columns of the row-parallel weights, and full copies of everything else."""
    shards = [{} for _ in range(ranks)]
    for key, value in sd.items():
        for r, shard in enumerate(shards):
            if "query_key_value" in key:
                n = value.shape[0] // 3 // ranks
                q, k, v = value[:n * ranks], value[n * ranks:2 * n * ranks], value[2 * n * ranks:]
                shard[key] = torch.cat([q[r * n:(r + 1) * n], k[r * n:(r + 1) * n], v[r * n:(r + 1) * n]])
            elif key == "word_embeddings.weight" or "dense_h_to_4h" in key:
                n = value.shape[0] // ranks
                shard[key] = value[r * n:(r + 1) * n].clone()
            elif key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                n = value.shape[1] // ranks
                shard[key] = value[:, r * n:(r + 1) * n].clone()
            else:
                shard[key] = value.clone()
    return shards


def write_layout(model: GLMModel, layout: str, root) -> object:
    """``model`` saved in ``layout`` under ``root``, by hand; returns the path to load."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    if layout == "official-flat":  # released archives: the .pt directly in the folder
        torch.save({"module": sd, "iteration": 0}, root / "mp_rank_00_model_states.pt")
    elif layout in ("official-mp2", "deepspeed-mp2"):
        tracker, tag = ("latest_checkpointed_iteration.txt", "1000") if layout == "official-mp2" else (
            "latest", "global_step1000")
        (root / tag).mkdir()
        (root / tracker).write_text(tag + "\n")
        for r, shard in enumerate(strided_split(sd, 2)):
            torch.save({"module": shard, "iteration": 1000}, root / tag / f"mp_rank_{r:02d}_model_states.pt")
    elif layout == "hf-bin":
        torch.save(sd, root / "pytorch_model.bin")
    elif layout == "hf-bin-sharded":
        keys = sorted(sd)
        parts = {"pytorch_model-00001-of-00002.bin": keys[:7], "pytorch_model-00002-of-00002.bin": keys[7:]}
        for name, part in parts.items():
            torch.save({f"glm.{k}": sd[k] for k in part}, root / name)
        weight_map = {f"glm.{k}": name for name, part in parts.items() for k in part}
        (root / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout in ("hf-safetensors", "hf-safetensors-sharded"):
        save_file = pytest.importorskip("safetensors.torch").save_file
        if layout == "hf-safetensors":
            save_file({**sd, "dense.weight": torch.ones(2)}, root / "model.safetensors")
        else:
            keys = sorted(sd)
            save_file({k: sd[k] for k in keys[:5]}, root / "a.safetensors")
            save_file({k: sd[k] for k in keys[5:]}, root / "b.safetensors")
            weight_map = {k: "a.safetensors" if i < 5 else "b.safetensors" for i, k in enumerate(keys)}
            (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "ours":
        return save_ours(model, root / "model.ckpt")
    return root


FOLDER_LAYOUTS = ["official-flat", "official-mp2", "deepspeed-mp2", "hf-bin", "hf-bin-sharded",
                  "hf-safetensors", "hf-safetensors-sharded", "ours"]


@pytest.mark.parametrize("layout", FOLDER_LAYOUTS)
def test_load_glm_from_each_layout_gives_the_original_logits(tmp_path, layout):
    source = source_model()
    path = write_layout(source, layout, tmp_path / layout)
    loaded = load_glm(path, num_attention_heads=HEADS)
    assert loaded.config == CONFIG
    assert not loaded.training
    torch.testing.assert_close(logits(loaded), logits(source), atol=1e-5, rtol=0)
    target = GLMModel(CONFIG)  # the pretraining job's route reads the same layouts
    init_weights(target, path)
    torch.testing.assert_close(logits(target), logits(source), atol=1e-5, rtol=0)


def test_merge_interleaves_qkv_per_block_and_split_inverts_it():
    sd = source_model().state_dict()
    shards = strided_split(sd, 2)
    merged = merge_model_parallel(shards)
    assert all(torch.equal(merged[k], v) for k, v in sd.items())
    naive = torch.cat([s["transformer.layers.0.attention.query_key_value.weight"] for s in shards])
    assert not torch.equal(naive, sd["transformer.layers.0.attention.query_key_value.weight"])
    for ours, theirs in zip(split_model_parallel(sd, 2), shards, strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def assert_same_weights(path, model: GLMModel) -> None:
    stored = read_state_dict(path)
    expected = model.state_dict()
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key


def test_export_then_import_is_the_identity(tmp_path):
    model = source_model()
    export_official(model, tmp_path / "official")
    assert (tmp_path / "official/latest_checkpointed_iteration.txt").read_text() == "release"
    stored = torch.load(tmp_path / "official/release/mp_rank_00_model_states.pt", weights_only=True)
    assert set(stored) == {"module", "model_config"}  # the official loaders read "module" only
    assert stored["model_config"]["num_attention_heads"] == HEADS != CONFIG.hidden_size // 64
    assert load_glm(tmp_path / "official").config == CONFIG  # the head count is not guessed
    assert_same_weights(tmp_path / "official", model)

    export_official(model, tmp_path / "mp2", model_parallel=2)
    for rank, expected in enumerate(strided_split(model.state_dict(), 2)):
        shard = torch.load(tmp_path / f"mp2/release/mp_rank_{rank:02d}_model_states.pt", weights_only=True)
        assert all(torch.equal(shard["module"][k], v) for k, v in expected.items())
    assert_same_weights(tmp_path / "mp2", model)

    export_hf(model, tmp_path / "hf")
    assert set(torch.load(tmp_path / "hf/pytorch_model.bin", weights_only=True)) == set(model.state_dict())
    assert_same_weights(tmp_path / "hf", model)
    assert_same_weights(save_ours(model, tmp_path / "ours.ckpt"), model)


def test_hf_config_json_has_the_hf_fields_and_supplies_the_head_count(tmp_path):
    model = source_model()
    export_hf(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "glm" and hf["architectures"] == ["GLMModel"]
    sizes = {"num_layers": 2, "vocab_size": 384, "hidden_size": 64, "num_attention_heads": 4,
             "max_sequence_length": 256}
    assert {k: hf[k] for k in sizes} == sizes
    assert hf["block_position_encoding"] is True and hf["attention_scale"] == 1.0
    assert hf["pool_token"] == "cls"
    for name in ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob",
                 "checkpoint_activations", "checkpoint_num_layers", "parallel_output", "relative_encoding",
                 "output_predict", "spell_length", "spell_func", "initializer_range"):
        assert name in hf
    assert load_glm(tmp_path).config == CONFIG  # heads from config.json, not hidden // 64


def test_export_official_refuses_an_uneven_split(tmp_path):
    with pytest.raises(ValueError, match="attention heads do not split over 3"):
        export_official(source_model(), tmp_path, model_parallel=3)


@pytest.mark.parametrize("overrides", [{}, {"block_position_encoding": False},
                                       {"intermediate_size": 96, "max_sequence_length": 40, "num_layers": 3}])
def test_infer_config_recovers_the_config(overrides):
    config = GLMConfig.from_name("tiny", vocab_size=300, **overrides)
    sd = GLMModel(config).state_dict()
    assert infer_config(sd, num_attention_heads=config.num_attention_heads) == config
    assert infer_config(sd).num_attention_heads == 1  # hidden 64 // head size 64
    wide = GLMModel(GLMConfig.from_name("tiny", hidden_size=256)).state_dict()
    assert infer_config(wide).num_attention_heads == 4
    with pytest.raises(ValueError, match="lacks word_embeddings.weight"):
        infer_config({})


def test_the_chinese_gmask_fix_copies_the_eop_row(tmp_path):
    config = GLMConfig.from_name("tiny", num_layers=1, vocab_size=50048)
    model = GLMModel(config)
    sd = model.state_dict()
    fixed = fix_chinese_gmask(sd)
    rows = fixed["word_embeddings.weight"]
    assert torch.equal(rows[50009], sd["word_embeddings.weight"][50007])
    assert not torch.equal(sd["word_embeddings.weight"][50009], sd["word_embeddings.weight"][50007])  # a copy
    others = torch.ones(50048, dtype=torch.bool)
    others[50009] = False
    assert torch.equal(rows[others], sd["word_embeddings.weight"][others])
    export_official(model, tmp_path)
    loaded = load_glm(tmp_path, num_attention_heads=4, fix_chinese_gmask_row=True)
    assert torch.equal(loaded.word_embeddings.weight[50009], sd["word_embeddings.weight"][50007])
    with pytest.raises(ValueError, match="Chinese vocabulary"):
        fix_chinese_gmask(source_model().state_dict())


def test_ours_is_a_lightning_checkpoint_of_the_pretraining_module(tmp_path):
    from glm_lightning.modules.pretrain import GLMPretrainModule

    model = source_model()
    module = GLMPretrainModule.load_from_checkpoint(save_ours(model, tmp_path / "m.ckpt"))
    assert module.model.config == CONFIG
    torch.testing.assert_close(logits(module.model), logits(model), atol=0, rtol=0)
    assert load_glm(tmp_path / "m.ckpt").config == CONFIG  # the stored config gives the heads


def test_jobs_pass_an_explicit_head_count_to_the_loader(tmp_path):
    """An official checkpoint stores no head count: 64-wide heads are assumed unless model.num_attention_heads
    says otherwise, and the generation, LM-evaluation and SuperGLUE jobs must pass it on."""
    from experiments.config import load_config
    from experiments.jobs.generate import load_model
    from experiments.jobs.superglue import load_backbone

    source = source_model()
    path = write_layout(source, "official-flat", tmp_path / "official")
    tokenizer = type("Tok", (), {"__len__": lambda self: CONFIG.vocab_size})()
    for exp in ("generate", "lm_eval"):
        cfg = load_config(exp, [f"model.init_from={path}", f"model.num_attention_heads={HEADS}",
                                "trainer.accelerator=cpu"])
        torch.testing.assert_close(logits(load_model(cfg, tokenizer)), logits(source), atol=1e-5, rtol=0)
    cfg = load_config("superglue", [f"model.init_from={path}", f"model.num_attention_heads={HEADS}"])
    config = load_backbone(cfg, tokenizer)
    assert config.num_attention_heads == HEADS
    guessed = load_backbone(load_config("superglue", [f"model.init_from={path}"]), tokenizer)
    assert guessed.num_attention_heads == CONFIG.hidden_size // 64 != HEADS


def test_unreadable_paths_fail_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nothing")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "hello.txt").write_text("hello\n")  # read as a legacy pickle: a KeyError in its memo
    with pytest.raises(ValueError, match="hello.txt is not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "hello.txt")
    (tmp_path / "latest").write_text("global_step5")
    with pytest.raises(FileNotFoundError, match="names checkpoint tag 'global_step5'"):
        read_state_dict(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_lightning.checkpoint", *map(str, args)],
                          capture_output=True, text=True, timeout=HANG_S)


def test_the_command_line_converts_and_inspects(tmp_path):
    source = source_model()
    official = write_layout(source, "official-mp2", tmp_path / "official")
    done = run_cli("convert", official, tmp_path / "hf", "--to", "hf", "--num-heads", HEADS)
    assert done.returncode == 0, done.stderr
    assert_same_weights(tmp_path / "hf", source)
    done = run_cli("convert", tmp_path / "hf", tmp_path / "mp2", "--to", "official", "--model-parallel", 2)
    assert done.returncode == 0, done.stderr
    for rank, expected in enumerate(strided_split(source.state_dict(), 2)):
        shard = torch.load(tmp_path / f"mp2/release/mp_rank_{rank:02d}_model_states.pt", weights_only=True)
        assert all(torch.equal(shard["module"][k], v) for k, v in expected.items())
    done = run_cli("convert", tmp_path / "mp2", tmp_path / "ours.ckpt", "--to", "ours", "--num-heads", HEADS)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(logits(load_glm(tmp_path / "ours.ckpt")), logits(source), atol=1e-5, rtol=0)

    done = run_cli("inspect", tmp_path / "mp2")
    assert done.returncode == 0, done.stderr
    assert "official (2-way model parallel)" in done.stdout
    assert f"parameters: {source.num_parameters():,}" in done.stdout
    assert "num_attention_heads: 4" in done.stdout and "max_sequence_length: 256" in done.stdout
    assert "heads: 4 (stored config)" in done.stdout  # written by our convert --to official
    done = run_cli("inspect", official)  # a released layout stores no head count
    assert done.returncode == 0, done.stderr
    assert "heads: 1 (a guess: hidden_size // 64, the head size of every released GLM; give --num-heads" \
        in done.stdout
    done = run_cli("inspect", tmp_path / "missing")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_a_hub_repo_id_that_cannot_be_fetched_is_a_clear_error(monkeypatch):
    # No network at test time: the hub client fails fast offline, and the error says what to do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # if imported before
    with pytest.raises(FileNotFoundError, match="THUDM/glm-large is not a local path .* pass its folder"):
        read_state_dict("THUDM/glm-large")


def test_local_paths_are_never_taken_for_hub_repo_ids(tmp_path, monkeypatch):
    source = source_model()
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    weights = read_state_dict("org/model")  # a relative path that looks like a repo id
    assert torch.equal(weights["word_embeddings.weight"], source.state_dict()["word_embeddings.weight"])


# Loading one weight at a time into a meta-device model (memory-mapped files).


def eager_state_dict(path) -> dict[str, torch.Tensor]:
    """Every file of a written layout read whole with torch.load / safetensors, shards merged at once: the
    loading path before meta-device construction, as the reference."""
    from safetensors.torch import load_file

    files = sorted(path.rglob("*.pt")) + sorted(path.rglob("*.bin")) + sorted(path.rglob("*.safetensors"))
    stored = [load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
              for f in ([path] if path.is_file() else files)]
    parts = [s.get("module") or {k.removeprefix("model."): v for k, v in s.get("state_dict", s).items()}
             for s in stored]
    if "official" in str(path):
        return merge_model_parallel(parts)
    return {k.removeprefix("glm."): v for part in parts for k, v in part.items() if k != "dense.weight"}


@pytest.mark.parametrize("layout", ["official-mp2", "hf-safetensors", "hf-bin-sharded", "ours"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_meta_device_loading_equals_the_eager_path(tmp_path, layout, dtype):
    """Exactly the weights and logits of reading the files whole; a fp16 checkpoint is cast per weight;
    the model owns its memory (rewriting the checkpoint file afterwards changes nothing)."""
    source = source_model().to(dtype)
    path = write_layout(source, layout, tmp_path / layout)
    expected = eager_state_dict(path)
    loaded = load_glm(path, num_attention_heads=HEADS)
    reference = GLMModel(CONFIG)
    reference.load_state_dict(expected)  # cast to fp32 by copy, as before
    for key, value in reference.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(logits(loaded), logits(reference), atol=0, rtol=0)
    in_dtype = load_glm(path, num_attention_heads=HEADS, dtype=dtype)
    assert all(torch.equal(in_dtype.state_dict()[k], v) for k, v in expected.items())
    for file in [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]:
        file.write_bytes(b"\0" * file.stat().st_size)  # same size, other bytes: a mapping would see them
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_streaming_releases_file_pages_and_keeps_the_data(tmp_path):
    """Each weight's file pages leave the process once the next weight is read; reading it again still
    gives the stored values (the pages come back from the file)."""
    path = tmp_path / "big.pt"
    torch.save({"module": {"a": torch.randn(4_000_000), "b": torch.randn(4_000_000)}}, path)  # 16 MB each
    stored = read_checkpoint(path)
    assert stored.mapped
    a = stored.shards[0]["a"]
    expected = torch.load(path, weights_only=True)["module"]

    def file_rss_kb() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["RssFile"].split()[0])

    stream = stored.stream(["a", "b"])
    before = file_rss_kb()
    key, weight = next(stream)
    assert key == "a" and torch.equal(weight, expected["a"])  # touches its 16 MB
    touched = file_rss_kb()
    next(stream)  # releases a (b is not read until used)
    assert touched - before > 12_000 and touched - file_rss_kb() > 12_000
    assert torch.equal(a, expected["a"])


@pytest.mark.parametrize("layout", ["ours", "hf"])
def test_convert_refuses_an_existing_output_without_overwrite(tmp_path, capsys, layout):
    source = save_ours(source_model(), tmp_path / "source.ckpt")
    dst = tmp_path / ("out.ckpt" if layout == "ours" else "out")
    if layout == "ours":
        dst.write_bytes(b"kept")
    else:
        dst.mkdir()
        (dst / "notes.txt").write_bytes(b"kept")
    kept = dst if layout == "ours" else dst / "notes.txt"
    assert checkpoint_main(["convert", str(source), str(dst), "--to", layout]) == 1
    assert capsys.readouterr().err == f"error: {dst} already exists; give --overwrite to replace it\n"
    assert kept.read_bytes() == b"kept"
    assert checkpoint_main(["convert", str(source), str(dst), "--to", layout, "--overwrite"]) == 0
    torch.testing.assert_close(logits(load_glm(dst)), logits(load_glm(source)), atol=0, rtol=0)
