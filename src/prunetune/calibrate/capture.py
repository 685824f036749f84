"""Step 1 of calibration: what the first decoder block receives, for every calibration batch.

The calibration token ids go through the model until its first decoder block; a forward
pre-hook on that block records its hidden states and whatever the architecture passes
besides (attention mask, position ids, rotary ``position_embeddings``, cache position, ...),
then stops the forward. Nothing here names a model family.
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.calibrate.blocks import Stop, TensorPool, map_tensors
from prunetune.calibrate.types import BlockInputs, CalibrationOptions  # BlockInputs re-exported: its old home
from prunetune.evaluate import model_device
from prunetune.modules import DecoderBlock


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: list[DecoderBlock], token_ids: torch.Tensor,
                   options: CalibrationOptions) -> BlockInputs:
    """Run the model up to its first decoder block and record what that block receives.

    Hidden states are stored on the device they arrive on, or in (pinned, when CUDA is
    available) CPU memory with ``options.offload_activations``.
    """
    input_device = model_device(model)
    inputs = BlockInputs()
    pool = TensorPool()

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        storage = torch.device("cpu") if options.offload_activations else hidden.device
        stored = hidden.detach().to(storage)
        if storage.type == "cpu" and torch.cuda.is_available():
            stored = stored.pin_memory()  # fast, asynchronous uploads to the accelerator
        inputs.hidden.append(stored)
        inputs.extras.append((map_tensors(tuple(args[1:]), pool), map_tensors(kwargs, pool)))
        raise Stop

    handle = blocks[0].module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, token_ids.shape[0], options.batch_size):
            batch = token_ids[start : start + options.batch_size].to(input_device)
            try:
                model(input_ids=batch, use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    if len(inputs.hidden) != -(-token_ids.shape[0] // options.batch_size):
        raise RuntimeError(f"the first decoder block ({blocks[0].name}) did not run during the model's forward")
    return inputs
