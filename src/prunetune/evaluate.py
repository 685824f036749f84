"""Perplexity by the protocol of the Wanda / SparseGPT papers.

The evaluation stream is cut into non-overlapping windows of ``seqlen`` tokens (the
remainder is dropped); each window is scored on its own, the mean next-token negative
log-likelihood over all windows is taken in float32, and perplexity is its exp. Windows
are scored in batches; the result does not depend on the batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunetune.errors import UsageError
from prunetune.loading import max_positions


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    seqlen: int
    tokens: int  # tokens scored (windows x (seqlen - 1))
    seconds: float
    dataset: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    """Where the model's inputs go: its input embeddings' device."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def check_seqlen(model, seqlen: int) -> None:
    limit = max_positions(model)
    if seqlen < 2:
        raise UsageError(f"seqlen={seqlen} is too short: perplexity needs windows of at least 2 tokens.")
    if limit is not None and seqlen > limit:
        raise UsageError(f"seqlen={seqlen} exceeds the model's maximum of {limit} positions; use --seqlen {limit} or less.")


@torch.no_grad()
def perplexity(
    model,
    stream: torch.Tensor,
    seqlen: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``stream`` (1, N) in non-overlapping windows of ``seqlen``.

    Args:
        model: a causal LM (anything returning ``.logits``).
        stream: token ids, shape (1, N).
        seqlen: window length.
        batch_size: windows per forward pass.
        max_windows: score only the first windows (quick checks).
        progress: show a tqdm bar.
        autocast_dtype: run the forward under autocast to this dtype (bf16/fp16).

    Raises:
        UsageError: seqlen above the model's maximum, or a stream shorter than one window.
    """
    check_seqlen(model, seqlen)
    windows = stream.shape[-1] // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise UsageError(f"The evaluation data holds {stream.shape[-1]} tokens, fewer than one window of seqlen={seqlen}. Lower --seqlen or give more text.")
    device = model_device(model)
    ids = stream.reshape(-1)[: windows * seqlen].view(windows, seqlen)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    bar = tqdm(total=windows, desc="perplexity", unit="win", disable=not progress, leave=False)
    for first in range(0, windows, batch_size):
        batch = ids[first : first + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch, use_cache=False).logits
        # (B, T-1, V) predictions of tokens 1..T-1, loss in fp32
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += nll.double().cpu()
        bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    tokens = windows * (seqlen - 1)
    mean_nll = float(total_nll) / tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        windows=windows,
        seqlen=seqlen,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def evaluate_dataset(model, tokenizer, dataset: str, seqlen: int, batch_size: int = 8, split: str = "test",
                     max_windows: int | None = None, progress: bool = False, autocast_dtype=None,
                     cache_dir: str | None = None) -> PerplexityResult:
    """Perplexity on a named data source (see :mod:`prunetune.data`)."""
    from prunetune.data import eval_stream

    check_seqlen(model, seqlen)
    stream, documents = eval_stream(tokenizer, dataset, seqlen=seqlen, split=split, cache_dir=cache_dir)
    result = perplexity(model, stream, seqlen, batch_size=batch_size, max_windows=max_windows,
                        progress=progress, autocast_dtype=autocast_dtype)
    result.dataset = dataset
    result.fingerprint = documents.fingerprint
    return result


def default_seqlen(model, cap: int = 2048) -> int:
    """The model's context length, capped (the papers evaluate Llama at 2048 or 4096)."""
    limit = max_positions(model)
    return min(limit, cap) if limit else cap


def autocast_for(model) -> torch.dtype | None:
    """Half-precision models run their forward under autocast of their own dtype."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None
