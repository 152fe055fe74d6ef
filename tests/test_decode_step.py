"""The static-cache decoding step: the same tokens as the dynamic-cache decoding it replaced (the
expected tokens below were decoded by that code on these seeded models), compiled or not."""

from __future__ import annotations

import pytest
import torch

from datamodules.seq2seq import Seq2SeqCollator, build_seq2seq_sample
from glm_lightning import generation
from glm_lightning.generation import fill_blanks, generate
from glm_lightning.model import GLMConfig, GLMModel
from glm_lightning.modules.seq2seq import GLMSeq2SeqModule
from glm_lightning.tokenizer import GLMTokenizer

VOCAB, SOP, EOP, EOS = 300, 290, 87, 363  # [eop] and eos: tokens this model emits, so rows end early
NO_DROPOUT = dict(embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)
TEXT = "The bright [MASK] predicts the [sMASK] and the river [MASK] quickly."


def seeded_glm(vocab_size: int) -> GLMModel:
    """A tiny float32 GLM whose larger initialisation makes its output depend on the context."""
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=vocab_size, initializer_range=0.1)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four right-padded contexts of lengths 5, 12, 9 and 1 and their mask positions."""
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randint(0, 280, (n,), generator=g).tolist() for n in (5, 12, 9, 1)]
    ids = torch.zeros(4, 12, dtype=torch.long)
    positions = torch.zeros(4, 2, 12, dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, :len(c)] = torch.tensor(c)
        positions[b, 0, :len(c)] = torch.arange(len(c))
    return ids, positions, torch.tensor([len(c) for c in contexts]), torch.tensor([1, 11, 4, 0])


STRATEGIES = {
    "greedy": dict(strategy="greedy"),
    "greedy constrained": dict(strategy="greedy", min_length=3, no_repeat_ngram_size=2),
    "beam": dict(strategy="beam", num_beams=4, length_penalty=0.7, no_repeat_ngram_size=3, min_length=2),
    "beam plain": dict(strategy="beam", num_beams=3),
}


def decode_padded_batch(model: GLMModel, name: str, **extra) -> list[list[int]]:
    return generate(model, *padded_batch(), sop_id=SOP, eop_id=EOP, eos_id=EOS, max_new_tokens=10,
                    **STRATEGIES[name], **extra)


def decode_blanks(tokenizer: GLMTokenizer, name: str, **extra) -> list[list[int]]:
    return fill_blanks(seeded_glm(len(tokenizer)), tokenizer, TEXT, max_new_tokens=6, return_ids=True,
                       **STRATEGIES[name], **extra)


def seq2seq_module(tokenizer: GLMTokenizer, **generation) -> tuple[GLMSeq2SeqModule, dict]:
    """A seq2seq module decoding with beam search, and a padded batch of three sources."""
    config = GLMConfig.from_name("tiny", vocab_size=len(tokenizer), initializer_range=0.1, **NO_DROPOUT)
    torch.manual_seed(0)
    module = GLMSeq2SeqModule(config, tokenizer, generation=dict(
        strategy="beam", num_beams=4, length_penalty=0.7, no_repeat_ngram_size=3, min_length=2,
        max_new_tokens=8, **generation)).eval()
    sources = ["the river city market", "a garden", "the quiet bright morning of the long road"]
    samples = [build_seq2seq_sample(tokenizer, s, "a city", src_length=24, tgt_length=8) for s in sources]
    return module, Seq2SeqCollator(pad_id=tokenizer.pad_id)(samples)


# Decoded by the dynamic-cache implementation (Python bookkeeping, attention over the filled slots).
PADDED_BATCH = {
    "greedy": [[194, 194, 194], [117] * 10, [193, 364, 364, 364, 364, 364, 364], [205] * 10],
    "greedy constrained": [[194, 194, 225, 225, 364, 14, 14, 117, 178, 178],
                           [117, 117, 64, 117, 15, 205, 205, 117, 1, 1], [193, 364, 364],
                           [205, 205, 285, 285, 380, 380, 205, 167, 167, 205]],
    "beam": [[194, 194, 194], [117, 117, 117], [193, 364, 364],
             [205, 205, 205, 308, 308, 308, 205, 205, 340, 340]],
    "beam plain": [[194] * 10, [117, 117, 117] + [205] * 7, [193, 364, 364] + [253] * 7, [205] * 10],
}
BLANKS = {
    "greedy": [[376, 6, 6, 6, 6, 6], [149] * 6, [149, 149, 149, 149, 227, 227]],
    "greedy constrained": [[376, 6, 6, 25, 182, 182], [149, 149, 42, 42, 227, 42],
                           [483, 245, 316, 245, 227, 227]],
    "beam": [[376, 6, 6, 201, 201, 201], [149, 149, 149, 42, 42, 42], [149, 149, 149, 120, 120, 120]],
    "beam plain": [[376, 6, 6, 201, 201, 201], [149] * 6, [227, 120, 120, 120, 120, 120]],
}
SEQ2SEQ_BEAM = [[111, 6, 6, 201, 201, 201, 42, 42], [201, 201, 42, 201, 201, 201, 111, 111],
                [245, 245, 245, 201, 201, 201, 42, 42]]


@pytest.mark.parametrize("name", STRATEGIES)
def test_padded_batch_decodes_the_tokens_of_the_dynamic_cache(name: str) -> None:
    assert decode_padded_batch(seeded_glm(VOCAB), name) == PADDED_BATCH[name]


@pytest.mark.parametrize("name", STRATEGIES)
def test_multi_blank_infilling_decodes_the_tokens_of_the_dynamic_cache(tokenizer: GLMTokenizer,
                                                                        name: str) -> None:
    assert decode_blanks(tokenizer, name) == BLANKS[name]


def test_seq2seq_beam_search_decodes_the_tokens_of_the_dynamic_cache(tokenizer: GLMTokenizer) -> None:
    module, batch = seq2seq_module(tokenizer)
    assert module.decode(batch) == [tokenizer.decode(ids).strip() for ids in SEQ2SEQ_BEAM]


@pytest.fixture
def counted_compiles(monkeypatch: pytest.MonkeyPatch) -> list[torch.fx.GraphModule]:
    """Compile the step with a backend that records each graph it is given and runs it as traced."""
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    monkeypatch.setitem(generation.COMPILE_OPTIONS, "cpu", {"backend": recording_backend})
    generation._compiled_step.cache_clear()
    torch._dynamo.reset()
    yield graphs
    generation._compiled_step.cache_clear()
    torch._dynamo.reset()


def test_compiled_step_is_one_graph_per_row_count_and_decodes_the_same_tokens(
        counted_compiles: list[torch.fx.GraphModule], tokenizer: GLMTokenizer) -> None:
    model = seeded_glm(VOCAB)
    for name in ("greedy", "greedy constrained", "beam"):  # fullgraph: a graph break would raise
        assert decode_padded_batch(model, name, compile=True) == PADDED_BATCH[name], name
    # Every step of every call reuses the graph of its row count: 4 rows and 4 x 4 beams.
    assert len(counted_compiles) == 2
    assert decode_blanks(tokenizer, "greedy constrained", compile="true") == BLANKS["greedy constrained"]


def test_compile_setting_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [generation.compile_step(s, cpu) for s in ("auto", True, "true", False, "False")] == \
        [False, True, True, False, False]
    assert generation.compile_step("auto", cuda) and not generation.compile_step(False, cuda)
    with pytest.raises(ValueError, match="unknown generation compile setting 'yes'"):
        generation.compile_step("yes", cpu)


def test_banned_ngrams_are_those_of_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for t in range(0, 14):
            history = torch.randint(0, 4, (5, t), generator=g)  # 4 symbols: many repeats
            banned = generation.banned_ngrams(history, n)
            got: list[set[int]] = [set() for _ in range(5)]
            for row, token in zip(*(banned if banned is not None else ([], [])), strict=True):
                got[int(row)].add(int(token))
            assert got == [set(generation.banned_ngram_tokens(row, n)) for row in history.tolist()], (n, t)


def test_static_cache_step_equals_the_dynamic_cache_and_reorders_in_place() -> None:
    model = seeded_glm(VOCAB).double()
    ids, positions, sep, masks = padded_batch()
    valid = torch.arange(12)[None] < sep[:, None]
    static, dynamic = model.new_kv_cache(4, 14), model.new_kv_cache(4, 14)
    for cache in (static, dynamic):
        model(ids, positions, sep, kv_cache=cache)
    static.key_valid[:, :12] = valid
    order = torch.tensor([2, 0, 3, 1])
    tokens = [torch.full((4, 1), SOP), torch.tensor([[5], [6], [7], [8]])]
    dim1 = [masks, masks[order]]
    with generation._StaticSteps(model, static, False) as step:
        got = [step(tokens[0], dim1[0], 1)]
        assert static.length == 13 and static.position.tolist() == [13]
        keys = static.keys[0]
        static.reorder_(order)
        assert static.keys[0] is keys  # same buffers, rows moved
        got.append(step(tokens[1], dim1[1], 2))
        with pytest.raises(ValueError, match="KV cache full: 15 tokens > max_length 14"):
            step(tokens[1], dim1[1], 3)
    assert not static.static
    # The dynamic cache: attention over the filled slots only, under a mask for the padding.
    for t in (0, 1):
        if t == 1:
            dynamic.reorder(order)
            valid = valid[order]
        valid = torch.cat([valid, torch.ones(4, 1, dtype=torch.bool)], 1)
        position_ids = torch.stack([dim1[t], torch.full((4,), t + 1)], 1)[:, :, None]
        expected = model(tokens[t], position_ids, attention_mask=valid[:, None, None, :], kv_cache=dynamic)
        torch.testing.assert_close(got[t], expected[:, -1], rtol=1e-12, atol=1e-12)
