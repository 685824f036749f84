"""The recovery curves a report plots: one run's training loss and held-out perplexity against tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecoveryCurve:
    """What one recovery run logged, against tokens trained (optimizer steps x global batch x block size).

    ``perplexity`` is exp(eval_loss) on held-out blocks the run never trains on, the first point
    (0 tokens) being the pruned model; ``dense_perplexity`` is the dense model on the same blocks.
    """

    loss: list[tuple[int, float]] = field(default_factory=list)  # (tokens, training loss)
    perplexity: list[tuple[int, float]] = field(default_factory=list)  # (tokens, held-out perplexity)
    dense_perplexity: float | None = None
    text: str = ""  # which held-out text, when the run said
