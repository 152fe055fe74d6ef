"""model.init_from: GLM weights from our, official and Hugging Face style checkpoint files."""

import logging

import pytest
import torch

from experiments.config import load_config
from experiments.jobs.pretrain import build_module
from glm_lightning.checkpoint import init_weights, read_state_dict
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
    for key, value in start.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="model.init_from: .* lacks GLM weights"):
        build_module(load_config("quickstart", [f"model.init_from={path}"]), tokenizer)
