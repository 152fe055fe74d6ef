"""FlexAttention against SDPA on CPU (forward only, as torch supports it there): the block masks of
the GLM layouts, pretraining batches with padding, cloze batches (row per candidate and the packed
shared-context layout), KV-cache decoding; the backend choice and its one-line errors."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask
from torch.utils.data import DataLoader

from datamodules.cloze_collate import cloze_collate
from experiments.config import load_config
from glm_lightning.attention_mask import dense_block_mask, glm_attention_mask, glm_block_mask, real_lengths
from glm_lightning.blank_infilling import BlankInfillingCollator
from glm_lightning.cloze import encode_example
from glm_lightning.config import ConfigError
from glm_lightning.generation import fill_blanks, generate
from glm_lightning.model import GLMConfig, GLMModel, attention_backend, check_trainable
from glm_lightning.modules.cloze import GLMClozeModule
from glm_lightning.modules.pretrain import GLMPretrainModule

ATOL = 1e-5  # float32 logits; the two backends sum the same products in a different order

COPA = [
    {"idx": 0, "premise": "The market was quiet in the morning.", "choice1": "The farmer slept.",
     "choice2": "A famous painter repairs the ancient castle bridge.", "question": "cause", "label": 1},
    {"idx": 1, "premise": "The river crosses the valley.", "choice1": "The village has a harbor.",
     "choice2": "Quiet.", "question": "effect", "label": 0},
]


def single_token_example(tokenizer, text: str, length: int, idx: int) -> dict:
    """A single-token cloze row as ``encode_example`` lays it out: [CLS] text [MASK] eos, then
    [sop] at index sep, at the [MASK]'s position; right-padded to ``length``."""
    part_a = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.mask_id, tokenizer.eos_id]
    sep = len(part_a)
    input_ids = np.zeros(length, dtype=np.int64)
    input_ids[:sep + 1] = [*part_a, tokenizer.sop_id]
    position_ids = np.zeros((2, length), dtype=np.int64)
    position_ids[0, :sep + 1] = [*range(sep), sep - 2]
    position_ids[1, sep] = 1
    zeros = np.zeros((1, length), dtype=np.int64)
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "sep": np.array([sep]),
            "target_ids": zeros, "logit_mask": zeros, "label": idx % 2, "verbalizer_ids": np.array([60, 61]),
            "idx": idx}


def tiny(vocab_size: int, attention: str = "sdpa", **overrides) -> GLMConfig:
    return GLMConfig.from_name("tiny", vocab_size=vocab_size, attention=attention, embedding_dropout_prob=0.0,
                               attention_dropout_prob=0.0, output_dropout_prob=0.0, **overrides)


def flex_and_sdpa(model: torch.nn.Module, config: GLMConfig, run):
    """``run()`` on the SDPA path, then on the flex path of the same weights."""
    outputs = []
    for backend in ("sdpa", "flex"):
        config.attention = backend
        with torch.no_grad():
            outputs.append(run())
    return outputs


def documents(tokenizer, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """[CLS] words eos samples of different lengths, so that the collator pads the shorter ones."""
    rng = np.random.default_rng(seed)
    words = "the river city market long road bright morning quiet garden".split()
    out = []
    for n in lengths:
        ids = tokenizer.encode(" ".join(rng.choice(words, size=n)) + ".")
        out.append(np.array([tokenizer.cls_id, *ids, tokenizer.eos_id]))
    return out


# ----------------------------------------------------------------------------------------------
# Block masks
# ----------------------------------------------------------------------------------------------

def test_glm_block_mask_is_the_sdpa_mask_restricted_to_real_tokens():
    sep, lengths, L = torch.tensor([3, 150, 200]), torch.tensor([140, 260, 200]), 260
    block_mask = glm_block_mask(sep, lengths, L)
    pairs = create_mask(block_mask.mask_mod, 3, 1, L, L)
    pos = torch.arange(L)
    real = (pos[None, :, None] < lengths[:, None, None]) & (pos[None, None, :] < lengths[:, None, None])
    assert torch.equal(pairs, glm_attention_mask(sep, L) & real[:, None])
    # Key blocks (128 tokens) computed per query block: the third query block holds padding only
    # in samples 0 and 2 and is skipped; Part A (bidirectional, 150 tokens) makes sample 1's first
    # query block read the second key block, which causal attention alone would not.
    blocks = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    assert blocks[:, 0].tolist() == [[1, 2, 0], [2, 2, 3], [2, 2, 0]]


def test_decoding_block_masks_cover_query_lengths_one_and_several():
    sep = torch.tensor([4, 6])
    step = glm_block_mask(sep, None, 1, 9)  # one new token after 8 cached ones
    assert torch.equal(create_mask(step.mask_mod, 2, 1, 1, 9), glm_attention_mask(sep, 1, 9))
    several = glm_block_mask(None, None, 3, 9)
    assert torch.equal(create_mask(several.mask_mod, 1, 1, 3, 9), glm_attention_mask(None, 3, 9))
    explicit = glm_attention_mask(None, 2, 7) & (torch.arange(7) != 3)[None, None, None]  # a padded slot
    dense = dense_block_mask(explicit, 2)
    assert torch.equal(create_mask(dense.mask_mod, 2, 1, 2, 7), explicit.expand(2, 1, 2, 7))


def test_real_lengths_end_at_the_last_nonzero_first_position():
    positions = torch.zeros(3, 2, 6, dtype=torch.long)
    positions[0, 0, :4] = torch.tensor([0, 1, 2, 3])
    positions[1, 0] = torch.tensor([0, 1, 2, 1, 1, 1])  # Part B at the [MASK] slot 1, no padding
    assert real_lengths(positions).tolist() == [4, 6, 1]


# ----------------------------------------------------------------------------------------------
# flex == sdpa
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"span_prob": 0.0, "document_prob": 1.0},
                                     {"span_prob": 0.0, "sentence_prob": 1.0}])
def test_pretraining_batches_with_padding(tokenizer, options):
    torch.manual_seed(0)
    module = GLMPretrainModule(tiny(len(tokenizer))).eval()
    batch = BlankInfillingCollator(tokenizer, seed=5, **options)(documents(tokenizer, [60, 25, 41, 8]))
    lengths = real_lengths(batch["position_ids"])
    assert lengths.min() < batch["input_ids"].shape[1]  # the batch has padding
    sdpa, flex = flex_and_sdpa(module, module.model.config, lambda: module(batch))
    real = torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]
    torch.testing.assert_close(flex[real], sdpa[real], rtol=0, atol=ATOL)
    sdpa_loss, flex_loss = flex_and_sdpa(module, module.model.config, lambda: module.loss(batch)[0])
    torch.testing.assert_close(flex_loss, sdpa_loss, rtol=0, atol=ATOL)


def test_pretraining_blocks_of_padding_longer_than_a_block(tokenizer):
    """Rows of about 200 tokens next to one of 20: whole 128-token blocks of padding."""
    torch.manual_seed(0)
    module = GLMPretrainModule(tiny(len(tokenizer))).eval()
    batch = BlankInfillingCollator(tokenizer, seed=7)(documents(tokenizer, [100, 12]))
    assert batch["input_ids"].shape[1] > 128 + real_lengths(batch["position_ids"])[1]
    sdpa_loss, flex_loss = flex_and_sdpa(module, module.model.config, lambda: module.loss(batch)[0])
    torch.testing.assert_close(flex_loss, sdpa_loss, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("task", "shared"), [("COPA", False), ("COPA", True), ("RTE", False)])
def test_cloze_batches(tokenizer, task, shared):
    torch.manual_seed(0)
    module = GLMClozeModule(tiny(len(tokenizer)), task=task).eval()
    if task == "RTE":
        texts = ("The teacher visits the museum", "The river is narrow and the bridge is ancient today")
        rows = [single_token_example(tokenizer, text, 40, i) for i, text in enumerate(texts)]
    else:
        rows = [{**encode_example(task, ex, tokenizer, pattern_id=0, max_seq_length=64), "idx": i}
                for i, ex in enumerate(COPA)]
    batch = cloze_collate(rows, shared_context=shared)
    assert ("candidate_index" in batch) == shared
    sdpa, flex = flex_and_sdpa(module, module.model.config, lambda: module(batch))
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=ATOL)


class Recording(GLMModel):
    """A GLMModel that keeps the logits of every forward pass (the decoding steps)."""

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        self.steps.append(logits)
        return logits


def test_kv_cache_decoding(tokenizer):
    torch.manual_seed(0)
    config = tiny(len(tokenizer))
    model = Recording(config).eval()
    text = "The bright [MASK] predicts the [sMASK] and the river [MASK] quickly."
    contexts = [[tokenizer.cls_id, *tokenizer.encode(t), tokenizer.mask_id] for t in
                ("The river city", "A long road in the quiet bright morning garden")]
    width = max(map(len, contexts)) + 3  # right padding in every row
    ids = torch.zeros(2, width, dtype=torch.long)
    positions = torch.zeros(2, 2, width, dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, :len(c)] = torch.tensor(c)
        positions[b, 0, :len(c)] = torch.arange(len(c))
    sep = torch.tensor([len(c) for c in contexts])
    masks = sep - 1
    special = dict(sop_id=tokenizer.sop_id, eop_id=tokenizer.eop_id, max_new_tokens=6)
    runs = {
        "fill_blanks greedy": lambda: fill_blanks(model, tokenizer, text, max_new_tokens=6, return_ids=True),
        "fill_blanks beam": lambda: fill_blanks(model, tokenizer, text, strategy="beam", num_beams=3,
                                                max_new_tokens=4, return_ids=True),
        "padded batch greedy": lambda: generate(model, ids, positions, sep, masks, **special),
        "padded batch beam": lambda: generate(model, ids, positions, sep, masks, strategy="beam",
                                              num_beams=2, **special),
    }
    for name, run in runs.items():
        results = []
        for backend in ("sdpa", "flex"):
            config.attention, model.steps = backend, []
            results.append((run(), model.steps))
        (sdpa_tokens, sdpa_steps), (flex_tokens, flex_steps) = results
        assert flex_tokens == sdpa_tokens, name
        assert sum(len(t) for t in sdpa_tokens) > 4, name  # something was decoded
        assert len(flex_steps) == len(sdpa_steps), name
        for got, expected in zip(flex_steps[1:], sdpa_steps[1:], strict=True):  # [0]: the padded context
            torch.testing.assert_close(got, expected, rtol=0, atol=ATOL, msg=name)
        widths = {step.shape[1] for step in flex_steps[1:]}  # new tokens per step: 1, or a whole block
        assert 1 in widths and (max(widths) > 1 or "batch" in name), name


# ----------------------------------------------------------------------------------------------
# Choice of backend and errors
# ----------------------------------------------------------------------------------------------

def test_auto_is_flex_on_cuda_unless_attention_dropout_is_active():
    config = GLMConfig.from_name("tiny")  # attention_dropout_prob 0.1
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert config.attention == "auto"
    assert attention_backend(config, cuda, training=False) == "flex"
    assert attention_backend(config, cuda, training=True) == "sdpa"  # flex has no dropout
    assert attention_backend(config, cpu, training=False) == "sdpa"
    assert attention_backend(tiny(1024, "auto"), cuda, training=True) == "flex"
    assert attention_backend(tiny(1024, "flex"), cpu, training=True) == "flex"
    with pytest.raises(ConfigError, match=r"^model.attention=flex has no attention dropout \(model."
                                          r"attention_dropout_prob=0.1\); set it to 0, or use"):
        check_trainable(GLMConfig.from_name("tiny", attention="flex"), cuda)
    check_trainable(tiny(1024, "flex"), cuda)
    check_trainable(config, cpu)


def test_unknown_backend_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^unknown attention 'flash'; valid choices: auto, sdpa, flex$"):
        GLMConfig.from_name("tiny", attention="flash")
    with pytest.raises(ConfigError, match=r"^argument 'model.attention=flash': invalid value 'flash' for "
                                          r"'model.attention'; valid choices: auto, sdpa, flex$"):
        load_config("quickstart", ["model.attention=flash"])
    assert load_config("quickstart", ["model.attention=flex"]).model.attention == "flex"


def test_training_with_flex_on_cpu_fails_before_the_first_step(tokenizer):
    torch.manual_seed(0)
    module = GLMPretrainModule(tiny(len(tokenizer), "flex"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = BlankInfillingCollator(tokenizer, seed=3)(documents(tokenizer, [30, 20]))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=2,
                        limit_val_batches=0)
    message = (r"^model.attention=flex cannot train on cpu: FlexAttention's backward pass needs CUDA; "
               r"use model.attention=sdpa or auto$")
    with pytest.raises(ConfigError, match=message):
        loader = DataLoader([batch] * 2, batch_size=None)
        trainer.fit(module, loader, val_dataloaders=loader)
    assert trainer.global_step == 0
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
