"""The shape of the model a recovery run would load, without loading it: counted on the ``meta`` device.

From a config (a local folder, a ``config.json``, a GGUF file's metadata) or, for hub ids that
cannot be read offline, from :data:`KNOWN_SHAPES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prunetune.errors import UsageError
from prunetune.loading import LoadOptions, load_config
from prunetune.modules import find_decoder_blocks, prunable_layers

BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit moments (bitsandbytes' min_8bit_size)

# Well-known shapes, for hub ids that cannot be read offline: the values of each model's config.json.
KNOWN_SHAPES: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, intermediate_size=13824,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-70b-hf": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False),
    "huggyllama/llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=2048, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       max_position_embeddings=8192, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=32768, tie_word_embeddings=False),
}
KNOWN_SHAPES["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]



@dataclass
class ModelShape:
    """What the estimate needs to know about a model, counted on a ``meta``-device instance.

    Attributes:
        name: the model as given; source: where the shape came from (said in the output).
        params: all parameters; masked: weights of the prunable linear layers (the masks' size);
        linear: weights of every linear layer, the output layer included (autocast copies them);
        block_params: parameters of the largest decoder block (FSDP2 gathers one block at a time);
        matrices: (rows, cols) of every 2-d parameter; small: parameters in tensors under 4,096 values;
        embedding: parameters of embedding layers (the Trainer gives them 32-bit bitsandbytes state).
    """

    name: str
    source: str
    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head size
    vocab: int
    params: int
    masked: int
    linear: int
    block_params: int
    small: int
    embedding: int = 0
    matrices: list[tuple[int, int]] = field(default_factory=list)


def shape_from_config(config, name: str, source: str) -> ModelShape:
    """Count a config's model on the ``meta`` device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    blocks = find_decoder_blocks(model)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                       or getattr(config, "n_inner", None) or 4 * hidden)
    return ModelShape(
        name=name, source=source, model_type=str(getattr(config, "model_type", "?")), hidden=hidden,
        layers=len(blocks), intermediate=intermediate, heads=heads, kv_dim=kv_heads * head_dim,
        vocab=int(config.vocab_size), params=sum(p.numel() for p in params),
        masked=sum(m.weight.numel() for m in prunable_layers(model).values()),
        linear=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        block_params=max((sum(p.numel() for p in block.module.parameters()) for block in blocks), default=0),
        small=sum(p.numel() for p in params if p.numel() < BNB_MIN_8BIT_SIZE),
        embedding=sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()),
        matrices=[tuple(p.shape) for p in params if p.dim() == 2],
    )


def _known(name: str | None) -> str | None:
    if not name:
        return None
    lowered = {key.lower(): key for key in KNOWN_SHAPES}
    return lowered.get(name.strip().rstrip("/").lower())


def model_shape(model_name_or_path: str, config_name: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model a recovery run would load, without loading it.

    In order: ``--config_name`` as a local folder or ``config.json``; ``--model_name_or_path`` as a
    local folder, GGUF file or bundled name; a hub id of :data:`KNOWN_SHAPES` (either flag); else the
    hub (its cache, or the network when reachable).

    Raises:
        UsageError: none of these gives a config.
    """
    if config_name and Path(config_name).expanduser().exists():
        path = Path(config_name).expanduser()
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UsageError(f"--config_name {config_name}: not a readable transformers config ({err}).") from err
        return shape_from_config(config, model_name_or_path, f"config {path}")
    local = Path(model_name_or_path).expanduser()
    if local.exists() or model_name_or_path in ("tiny", "smollm2-135m"):
        config = load_config(model_name_or_path, LoadOptions(trust_remote_code=trust_remote_code))
        return shape_from_config(config, model_name_or_path, f"config of {model_name_or_path}")
    for given in (model_name_or_path, config_name):
        known = _known(given)
        if known is not None:
            values = dict(KNOWN_SHAPES[known])
            config = AutoConfig.for_model(values.pop("model_type"), **values)
            return shape_from_config(config, model_name_or_path, f"prunetune's built-in shape of {known}")
    try:
        config = load_config(model_name_or_path, LoadOptions(trust_remote_code=trust_remote_code))
    except UsageError as err:
        raise UsageError(
            f"--memory_estimate needs the shape of {model_name_or_path}, and no config could be read ({err}) Give "
            "--config_name a local folder or config.json of the model, or a hub id prunetune knows offline: "
            f"{', '.join(KNOWN_SHAPES)}.") from err
    return shape_from_config(config, model_name_or_path, f"config of {model_name_or_path}")
