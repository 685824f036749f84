"""Mistakes a library caller or a model file can make end as one-paragraph UsageErrors, not tracebacks."""

import pytest
import torch
from factories import make_model

from prunetune.errors import UsageError
from prunetune.masks import MaskSet


def test_masks_of_an_unknown_layer_name_the_layer():
    model = make_model("llama")
    masks = MaskSet.from_zeros(model)
    masks.masks["model.layers.7.mlp.up_proj"] = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(UsageError, match=r"1 of the \d+ masked layers are not in the LlamaForCausalLM model: "
                                         r"model\.layers\.7\.mlp\.up_proj .*model\.layers\.0\."):
        masks.layers(model)
    del masks.masks["model.layers.7.mlp.up_proj"]
    assert set(masks.layers(model)) == set(masks.masks)
