"""Predicted peak GPU memory of ``--recovery_method full``, from the model's shape alone (``--memory_estimate``).

A prediction, never a measurement: ``prunetune recover ... --memory_estimate`` prints it before
any weight is read, and ``benchmarks/full_7b_memory.py`` measures the same setups on a GPU. The
model's shape comes from a config (a local folder, a ``config.json``, a GGUF file's metadata), or
from a built-in table of well-known hub models (:data:`.shape.KNOWN_SHAPES`), so a 7B estimate works
offline. The config is instantiated on the ``meta`` device: parameter counts, which layers the
masks cover and each block's size are exact for any architecture.

What one process holds at its peak, per term (P parameters, M of them masked, w bytes per weight):

* weights ``P w``; gradients ``P w`` (the Trainer frees them after each step, so they count only
  in the backward pass and the optimizer step); masks ``M`` bytes (bool on CUDA, see
  :mod:`prunetune.recover.full`); optimizer state from :data:`prunetune.recover.optimizers.OPTIMIZERS` (torch AdamW: two moments
  in the weights' dtype; bitsandbytes 8-bit: 1 byte per moment plus a float32 scale per 256
  values, tensors under 4,096 values and, as the Trainer registers them, embeddings in 32 bits).
* activations saved for the backward pass, per token and decoder block, counted from what
  autograd keeps in a Llama-style block with SDPA attention (the CPU test checks the count
  against autograd's own saved tensors): each norm keeps its float32 input and its output,
  each linear layer its input (under autocast one bf16 copy per layer: q, k and v cast the norm
  output three times), attention its q, k, v, output and log-sum-exp, the MLP four
  intermediate-sized tensors. With gradient checkpointing only each block's input is kept and
  one block is recomputed at a time.
* under autocast with float32 weights, the bf16 copies of every linear weight that autocast
  caches for the whole forward pass (2 bytes per linear weight), even with checkpointing.
* the loss: logits as computed, a float32 copy, the saved log-softmax and its gradient.
* optimizer temporaries: a foreach AdamW step (``adamw_torch``) allocates one weight-sized
  tensor (``sqrt`` of the second moment); the fused and 8-bit steps none.
* FSDP2 over N processes: weights, gradients, optimizer state and masks divided by N, plus two
  blocks gathered whole (the running one and the prefetched next); compute in the mixed-precision
  dtype (no autocast copies). Accelerate keeps float32 master weights under FSDP2 with
  ``--bf16`` whatever ``--dtype``. Before the Trainer shards it, every process holds the whole
  model as loaded and its masks (the recipe loads the model onto each GPU), a moment of its own.
  DDP adds a gradient-sized bucket buffer.

The peak is the largest of three moments: the end of the forward pass (activations, autocast
copies, loss), the end of the backward pass (all gradients), the optimizer step (gradients and
step temporaries), each on top of weights, masks and optimizer state. The CUDA context and the
caching allocator's slack come on top of this count (they are outside PyTorch's "allocated").

Modules: :mod:`.shape` (the model's shape, counted on the ``meta`` device), :mod:`.estimate`
(the terms and the peak), :mod:`.report` (the dry run's text and the recipe's hook).
"""

from prunetune.recipe.memory_estimate.estimate import (
    DTYPE_BYTES,
    GB,
    RECOMMENDED,
    GiB,
    MemoryEstimate,
    TrainingSetup,
    block_activation_bytes,
    estimate,
    optimizer_memory,
)
from prunetune.recipe.memory_estimate.report import announce, report, setup_from_args
from prunetune.recipe.memory_estimate.shape import KNOWN_SHAPES, ModelShape, model_shape, shape_from_config

__all__ = ["DTYPE_BYTES", "GB", "GiB", "KNOWN_SHAPES", "RECOMMENDED", "MemoryEstimate", "ModelShape", "TrainingSetup",
           "announce", "block_activation_bytes", "estimate", "model_shape", "optimizer_memory", "report",
           "setup_from_args", "shape_from_config"]
