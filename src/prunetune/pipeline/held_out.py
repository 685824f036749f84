"""The Trainer's held-out blocks, kept to score the dense model on the very same text.

The report's perplexity curve comes from the Trainer's own evaluation (exp of eval_loss) on
the blocks the recovery recipe holds out; the dense reference line must be measured on
those blocks too, or it would compare two texts.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from prunetune.evaluate import autocast_for, perplexity


class HeldOutBlocks(TrainerCallback):
    """Keeps the token ids of the blocks the Trainer evaluates on, to score the dense model on the same text.

    The Trainer's eval_loss is the mean next-token loss over whole blocks whose labels are their
    inputs; :func:`prunetune.evaluate.perplexity` on the same blocks (windows of the block size)
    computes the same mean, so its exp is directly comparable. Blocks whose labels differ from
    their inputs (masked tokens) are not kept: no reference is drawn rather than a wrong one.
    """

    def __init__(self):
        self.input_ids = None

    def on_evaluate(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.input_ids is not None or eval_dataloader is None:
            return
        blocks = []
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the CPU RNG: leave training's alone
            for batch in eval_dataloader:
                ids = batch["input_ids"]
                if "labels" in batch and not torch.equal(batch["labels"], ids):
                    return
                blocks.append(ids.cpu())
        self.input_ids = torch.cat(blocks) if blocks else None

    def perplexity(self, model, batch_size: int) -> float:
        blocks, block_size = self.input_ids.shape
        return perplexity(model, self.input_ids.reshape(1, -1), block_size, batch_size=batch_size,
                          max_windows=blocks, autocast_dtype=autocast_for(model)).perplexity
