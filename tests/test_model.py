"""GLM backbone: layout of the attention, 2D positions, KV cache, tying, presets, state dict."""

import io
import math

import pytest
import torch

from glm_lightning.attention_mask import glm_attention_mask
from glm_lightning.model import PRESETS, GLMConfig, GLMModel, pad_vocab_size

B, L = 3, 14
SEP = torch.tensor([6, 9, 14])  # the last sample is all Part A


@pytest.fixture(scope="module")
def model() -> GLMModel:
    torch.manual_seed(0)
    return GLMModel(GLMConfig.from_name("tiny", vocab_size=300)).eval()


def glm_positions(sep: torch.Tensor, length: int) -> torch.Tensor:
    """Part A at 0..sep-1 (block 0); Part B generated at the last Part-A slot (blocks 1, 2, ...)."""
    idx = torch.arange(length)
    rows = []
    for s in sep.tolist():
        dim1 = torch.where(idx < s, idx, torch.tensor(s - 1))
        dim2 = torch.where(idx < s, 0, idx - s + 1)
        rows.append(torch.stack([dim1, dim2]))
    return torch.stack(rows)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (B, L), generator=g), glm_positions(SEP, L)


def official_mask(sep: torch.Tensor, length: int) -> torch.Tensor:
    """The official construction: lower-triangular ones, then every column < sep set to one."""
    m = torch.tril(torch.ones(len(sep), 1, length, length))
    for b, s in enumerate(sep.tolist()):
        m[b, :, :, :s] = 1
    return m


def reference_forward(model: GLMModel, ids: torch.Tensor, pos: torch.Tensor,
                      sep: torch.Tensor) -> torch.Tensor:
    """An independent re-implementation from the weights: explicit softmax with the official
    ``scores * mask - 65504 * (1 - mask)`` masking and the tanh GeLU formula."""
    sd = model.state_dict()
    cfg = model.config
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    d = H // nh
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (H,), sd[p + ".weight"], sd[p + ".bias"], 1e-5)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3)))  # noqa: E731
    h = (sd["word_embeddings.weight"][ids] + sd["transformer.position_embeddings.weight"][pos[:, 0]]
         + sd["transformer.block_position_embeddings.weight"][pos[:, 1]])
    mask = official_mask(sep, ids.shape[1])
    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        qkv = lin(ln(h, p + "input_layernorm"), p + "attention.query_key_value")
        q, k, v = (t.reshape(*ids.shape, nh, d).transpose(1, 2) for t in qkv.split(H, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores * mask - 65504.0 * (1 - mask)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*ids.shape, H)
        h = h + lin(attn, p + "attention.dense")
        x = ln(h, p + "post_attention_layernorm")
        h = h + lin(gelu(lin(x, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
    h = ln(h, "transformer.final_layernorm")
    return h @ sd["word_embeddings.weight"].T


def test_output_shape_dtype_and_padded_vocab(model):
    ids, pos = inputs()
    logits = model(ids, pos, SEP)
    assert logits.shape == (B, L, 384) and logits.dtype == torch.float32
    assert model.config.vocab_size == 384 == pad_vocab_size(300)
    assert pad_vocab_size(30522) == 30592 and pad_vocab_size(50257) == 50304 and pad_vocab_size(128) == 128
    assert model.word_embeddings.weight.shape == (384, 64)


def test_matches_independent_reference():
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=300)).eval()
    with torch.no_grad():  # large random weights, so every detail (GeLU form, LN, scale) shows
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    ids, pos = inputs()
    torch.testing.assert_close(model(ids, pos, SEP), reference_forward(model, ids, pos, SEP),
                               atol=1e-4, rtol=1e-5)


def test_part_a_never_sees_part_b(model):
    ids, pos = inputs()
    base = model(ids, pos, SEP)
    changed = ids.clone()
    for b, s in enumerate(SEP.tolist()):
        changed[b, s:] = (changed[b, s:] + 7) % 300
    out = model(changed, pos, SEP)
    for b, s in enumerate(SEP.tolist()):
        torch.testing.assert_close(out[b, :s], base[b, :s], atol=0, rtol=0)
        if s < L:
            assert not torch.allclose(out[b, s:], base[b, s:])


def test_part_b_sees_part_a_and_earlier_part_b_only(model):
    ids, pos = inputs()
    base = model(ids, pos, SEP)
    b, s = 1, SEP[1].item()
    # Changing the last Part-A token changes every Part-B logit (bidirectional context).
    changed = ids.clone()
    changed[b, s - 1] = (changed[b, s - 1] + 1) % 300
    out = model(changed, pos, SEP)
    assert (out[b, s:] - base[b, s:]).abs().amax(-1).min() > 1e-6
    # Changing Part-B token t changes positions >= t, never the ones before it (causal).
    t = s + 2
    changed = ids.clone()
    changed[b, t] = (changed[b, t] + 1) % 300
    out = model(changed, pos, SEP)
    torch.testing.assert_close(out[b, :t], base[b, :t], atol=0, rtol=0)
    assert (out[b, t:] - base[b, t:]).abs().amax(-1).min() > 1e-6


def test_mask_builder_equals_official_construction():
    mask = glm_attention_mask(SEP, L)
    assert mask.dtype == torch.bool and mask.shape == (B, 1, L, L)
    assert torch.equal(mask, official_mask(SEP, L).bool())


def test_explicit_mask_equals_sep_path(model):
    ids, pos = inputs()
    explicit = official_mask(SEP, L).bool()
    torch.testing.assert_close(model(ids, pos, attention_mask=explicit), model(ids, pos, SEP),
                               atol=1e-6, rtol=1e-6)


def test_no_sep_is_causal(model):
    ids, pos = inputs()
    torch.testing.assert_close(model(ids, pos), model(ids, pos, torch.zeros(B, dtype=torch.long)),
                               atol=1e-6, rtol=1e-6)


def test_block_positions_change_part_b_logits(model):
    ids, pos = inputs()
    base = model(ids, pos, SEP)
    shifted = pos.clone()
    shifted[:, 1] = torch.where(shifted[:, 1] > 0, shifted[:, 1] + 1, 0)
    out = model(ids, shifted, SEP)
    b, s = 0, SEP[0].item()
    torch.testing.assert_close(out[b, :s], base[b, :s], atol=0, rtol=0)  # Part A has block 0
    assert (out[b, s:] - base[b, s:]).abs().amax(-1).min() > 1e-6


def test_without_block_positions_the_table_is_absent_and_dim2_ignored():
    torch.manual_seed(0)
    model = GLMModel(GLMConfig.from_name("tiny", vocab_size=300, block_position_encoding=False)).eval()
    assert not any("block_position" in k for k in model.state_dict())
    ids, pos = inputs()
    other = pos.clone()
    other[:, 1] = 5
    torch.testing.assert_close(model(ids, pos, SEP), model(ids, other, SEP), atol=0, rtol=0)


def test_kv_cache_token_by_token_equals_full_forward(model):
    ids, pos = inputs()
    full = model(ids, pos, SEP)
    prefill = 6  # every sample's Part A fits; sample 0 starts Part B inside the prefill
    cache = model.new_kv_cache(B, L)
    steps = [model(ids[:, :prefill], pos[:, :, :prefill], SEP, kv_cache=cache)]
    for t in range(prefill, L):
        steps.append(model(ids[:, t:t + 1], pos[:, :, t:t + 1], kv_cache=cache))
    assert cache.length == L
    torch.testing.assert_close(torch.cat(steps, 1)[0], full[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_chunks_and_reorder_equal_full_forward(model):
    ids, pos = inputs()
    sep = torch.full((B,), 5)
    full = model(ids, pos, sep)
    cache = model.new_kv_cache(B, L)
    a = model(ids[:, :5], pos[:, :, :5], sep, kv_cache=cache)
    b = model(ids[:, 5:9], pos[:, :, 5:9], kv_cache=cache)
    order = torch.tensor([2, 0, 1])
    cache.reorder(order)
    c = model(ids[order, 9:], pos[order][:, :, 9:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, full[order, 9:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :1], pos[:, :, :1], kv_cache=cache)


def test_output_mask_computes_only_the_selected_logits(model):
    ids, pos = inputs()
    selected = torch.arange(L)[None] >= SEP[:, None]  # Part B of every sample
    full = model(ids, pos, SEP)
    torch.testing.assert_close(model(ids, pos, SEP, output_mask=selected), full[selected],
                               atol=1e-6, rtol=1e-6)


def test_head_is_tied_to_word_embeddings(model):
    ids, pos = inputs()
    hidden = model(ids, pos, SEP, return_hidden=True)
    torch.testing.assert_close(model(ids, pos, SEP), hidden @ model.word_embeddings.weight.T)
    vocab_shaped = [k for k, v in model.state_dict().items() if v.shape[0] == model.config.vocab_size]
    assert vocab_shaped == ["word_embeddings.weight"]  # no separate output matrix, no bias
    model.zero_grad()
    model(ids, pos, SEP)[:, -1, 3].sum().backward()
    assert model.word_embeddings.weight.grad[3].abs().sum() > 0  # the head's gradient lands there
    model.zero_grad()


def test_state_dict_keys_are_the_official_keys():
    model = GLMModel(GLMConfig.from_name("tiny", num_layers=1))
    layer = ["input_layernorm.weight", "input_layernorm.bias",
             "attention.query_key_value.weight", "attention.query_key_value.bias",
             "attention.dense.weight", "attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
             "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
    expected = (["word_embeddings.weight", "transformer.position_embeddings.weight",
                 "transformer.block_position_embeddings.weight"]
                + [f"transformer.layers.0.{k}" for k in layer]
                + ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"])
    assert list(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["transformer.position_embeddings.weight"].shape == (257, 64)  # max_pos + 1 rows
    assert sd["transformer.layers.0.attention.query_key_value.weight"].shape == (192, 64)


def test_save_load_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = GLMModel(model.config).eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    ids, pos = inputs()
    torch.testing.assert_close(restored(ids, pos, SEP), model(ids, pos, SEP), atol=0, rtol=0)


def test_initialization():
    torch.manual_seed(0)
    cfg = GLMConfig.from_name("tiny", hidden_size=256, num_layers=8)
    model = GLMModel(cfg)
    std = lambda t: t.float().std().item()  # noqa: E731
    residual = 0.02 / math.sqrt(2 * 8)
    layer = model.transformer.layers[3]
    assert std(layer.attention.dense.weight) == pytest.approx(residual, rel=0.05)
    assert std(layer.mlp.dense_4h_to_h.weight) == pytest.approx(residual, rel=0.05)
    assert std(layer.attention.query_key_value.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.word_embeddings.weight) == pytest.approx(0.02, rel=0.05)
    assert torch.all(layer.mlp.dense_h_to_4h.bias == 0) and torch.all(layer.input_layernorm.weight == 1)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = GLMConfig.from_name("tiny", vocab_size=300, embedding_dropout_prob=0.0,
                              attention_dropout_prob=0.0, output_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = GLMModel(cfg).train()
    recomputed = GLMModel(GLMConfig(**{**cfg.__dict__, "checkpoint_activations": True})).train()
    recomputed.load_state_dict(plain.state_dict())
    ids, pos = inputs()
    for m in (plain, recomputed):
        m(ids, pos, SEP).logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_presets_and_overrides():
    assert set(PRESETS) == {"tiny", "glm-base", "glm-large", "glm-roberta-large", "glm-410m",
                            "glm-515m", "glm-2b", "glm-10b"}
    cfg = GLMConfig.from_name("glm-large", num_layers=2)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 1024, 4096)
    with pytest.raises(ValueError, match="glm-large"):
        GLMConfig.from_name("glm-largee")
    with pytest.raises(TypeError, match="num_layerz"):
        GLMConfig.from_name("tiny", num_layerz=3)
    with pytest.raises(ValueError, match="divisible"):
        GLMConfig.from_name("tiny", num_attention_heads=5)


def parameter_count(name: str) -> int:
    with torch.device("meta"):
        return GLMModel(GLMConfig.from_name(name)).num_parameters()


# Sizes of the released models (the paper's names). GLM-2B is "~2B" there: checked to 5%.
@pytest.mark.parametrize("name,expected,tolerance", [
    ("glm-base", 110e6, 0.03), ("glm-large", 335e6, 0.03), ("glm-410m", 410e6, 0.03),
    ("glm-515m", 515e6, 0.03), ("glm-10b", 10e9, 0.03), ("glm-2b", 2e9, 0.05),
])
def test_preset_parameter_counts(name, expected, tolerance):
    assert parameter_count(name) == pytest.approx(expected, rel=tolerance)


def test_roberta_preset_is_glm_large_with_the_bpe_vocabulary():
    # The paper quotes 335M for GLM-RoBERTa as for GLM-Large; the architecture is the same and
    # only the embedding differs (50304 BPE rows instead of 30592 WordPiece rows).
    assert parameter_count("glm-roberta-large") - parameter_count("glm-large") == (50304 - 30592) * 1024


def test_kv_cache_restore_returns_to_a_snapshot(model):
    ids, pos = inputs()
    cache = model.new_kv_cache(B, L)
    model(ids[:, :6], pos[:, :, :6], SEP.clamp(max=6), kv_cache=cache)
    point = cache.snapshot()
    first = model(ids[:, 6:7], pos[:, :, 6:7], kv_cache=cache)
    model(ids[:, 7:9], pos[:, :, 7:9], kv_cache=cache)  # tokens to be discarded
    cache.restore(point)
    assert cache.length == 6
    torch.testing.assert_close(model(ids[:, 6:7], pos[:, :, 6:7], kv_cache=cache), first, atol=0, rtol=0)
