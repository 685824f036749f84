"""Decoder blocks and prunable layers are found for every architecture, by structure alone."""

import pytest
import torch
from factories import ARCHS, make_model

from prunetune.errors import UsageError
from prunetune.modules import find_decoder_blocks, prunable_layers, weight_matrix, weight_param_shape

EXPECTED = {
    "llama": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "mistral": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "qwen2": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "opt": ("model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}),
    "gpt_neox": ("gpt_neox.layers", {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"}),
    "gpt2": ("transformer.h", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_and_linears_found(arch):
    model = make_model(arch)
    blocks = find_decoder_blocks(model)
    stack, linears = EXPECTED[arch]
    assert [b.name for b in blocks] == [f"{stack}.{i}" for i in range(2)]
    for block in blocks:
        assert set(block.linears) == linears
    names = set(prunable_layers(model))
    # Embeddings and the LM head are never prunable.
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in names)
    assert len(names) == 2 * len(linears)


def test_conv1d_weight_is_seen_as_out_by_in():
    model = make_model("gpt2")
    c_fc = find_decoder_blocks(model)[0].linears["mlp.c_fc"]
    out_f, in_f = weight_param_shape(c_fc)
    assert (out_f, in_f) == (c_fc.nf, c_fc.weight.shape[0])
    view = weight_matrix(c_fc)
    assert view.shape == (out_f, in_f)
    view[0, 1] = 0.0  # the view writes through to the parameter
    assert c_fc.weight[1, 0].item() == 0.0
    x = torch.randn(3, in_f)
    assert torch.allclose(c_fc(x), x @ view.t() + c_fc.bias, atol=1e-5)


def test_target_and_ignore_patterns():
    model = make_model("llama")
    only_qv = prunable_layers(model, targets=["q_proj", "v_proj"])
    assert sorted(n.rsplit(".", 1)[-1] for n in only_qv) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    no_mlp = prunable_layers(model, ignore=["mlp.*"])
    assert all(".mlp." not in n for n in no_mlp) and len(no_mlp) == 8


def test_model_without_blocks_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    with pytest.raises(UsageError, match="decoder blocks"):
        find_decoder_blocks(model)
