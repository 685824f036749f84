"""What the model's shapes reveal about a pipeline file, checked before any stage runs (no weights loaded)."""

from __future__ import annotations

from prunetune.errors import UsageError, require
from prunetune.pipeline.config import PipelineConfig, setting_key


def check_model_shapes(config: PipelineConfig) -> int:
    """Check ``config`` against the model's skeleton; returns the bytes the per-layer error's Gram matrices take.

    Raises:
        UsageError: an N:M structure that does not tile a prunable layer, a window or block
            longer than the model's context, a model whose decoder blocks cannot be found.
    """
    from prunetune.loading import max_positions
    from prunetune.modules import prunable_layers, weight_param_shape

    skeleton = _skeleton(config)
    try:
        layers = prunable_layers(skeleton)
    except UsageError as err:
        raise UsageError(f"config.model: {err}") from err
    for index, spec in enumerate(config.prune):
        pruner = config.prune_config(spec).pruner
        for name, module in layers.items():
            try:
                pruner.check_layer(name, weight_param_shape(module)[1])
            except UsageError as err:
                raise UsageError(f"config.prune[{index}].sparsity_type: {err}") from err
    gram_bytes = sum(8 * weight_param_shape(module)[1] ** 2 for module in layers.values())  # float64 (in, in) each
    limit = max_positions(skeleton)
    if limit is None:
        return gram_bytes
    lengths = {"config.calibration.seqlen": config.calibration.seqlen, "config.evaluation.seqlen": config.evaluation.seqlen}
    for index, spec in enumerate(config.recover):
        for method in spec.methods:
            where = setting_key(spec, method, "block_size", f"config.recover[{index}]")
            lengths[where] = spec.for_method(method)["block_size"]
    for key, length in lengths.items():
        require(length is None or length <= limit,
                f"{key}: {length} tokens exceed the {limit} positions of {config.model}; give {limit} or less.")
    return gram_bytes


def _skeleton(config: PipelineConfig):
    """The model built from its config on the meta device: shapes without weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunetune.loading import LoadOptions, _load_failure, load_config

    model_config = load_config(config.model, LoadOptions(trust_remote_code=config.trust_remote_code, flag="config.model"))
    try:  # a GGUF file's config comes from its metadata
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"config.model: {_load_failure('model config', config.model, err)}") from err
