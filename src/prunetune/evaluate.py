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

from prunetune.data import check_validation_percent, eval_stream
from prunetune.errors import UsageError, require
from prunetune.loading import max_positions
from prunetune.modules import check_model


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
    # which text the perplexity was computed on, for people: "docs.txt, held-out first 5% of lines (210 of
    # 4,200)", "wikitext2 test (papers' protocol)" (prunetune.data's Documents.description)
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    """Where the model's inputs go: its input embeddings' device."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_window_options(seqlen=None, batch_size=8, max_windows=None, flags: bool = False) -> None:
    """Values any model accepts: seqlen >= 2 (None: the model's), batch_size >= 1, max_windows None or >= 1.

    Args:
        flags: name the values as command-line flags (``--batch_size 0``) instead of
            parameters (``batch_size=0``).
    """
    def named(name, value):
        return f"--{name} {value!r}" if flags else f"{name}={value!r}"

    require(seqlen is None or (_is_int(seqlen) and seqlen >= 2),
            f"{named('seqlen', seqlen)}: a window needs an integer of at least 2 tokens "
            "(default: the model's context, capped at 2048).")
    require(_is_int(batch_size) and batch_size >= 1,
            f"{named('batch_size', batch_size)}: give a positive integer number of windows per forward pass.")
    require(max_windows is None or (_is_int(max_windows) and max_windows >= 1),
            f"{named('max_windows', max_windows)}: give a positive integer number of windows, or leave it unset to score all.")


def check_seqlen(model, seqlen: int) -> None:
    """``seqlen`` is an integer >= 2 within the model's positions."""
    if not _is_int(seqlen) or seqlen < 2:
        raise UsageError(f"seqlen={seqlen!r} is not accepted: perplexity needs windows of an integer of at least 2 tokens.")
    limit = max_positions(model)
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
    desc: str = "perplexity",
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
        UsageError: seqlen above the model's maximum, a stream shorter than one window, a
            bad batch_size / max_windows, or NaN/inf logits (naming whether the weights hold NaN/inf).
    """
    check_model(model)
    check_window_options(seqlen, batch_size, max_windows)
    require(torch.is_tensor(stream) and not stream.is_floating_point() and not stream.is_complex(),
            f"stream must be a tensor of token ids, shape (1, N), got {getattr(stream, 'dtype', type(stream).__name__)}.")
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
    bar = tqdm(total=windows, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for first in range(0, windows, batch_size):
            batch = ids[first : first + batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch, use_cache=False).logits
            # (B, T-1, V) predictions of tokens 1..T-1, loss in fp32
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            ).double().cpu()
            if not torch.isfinite(nll):  # a perplexity of nan would pass for a number downstream
                raise UsageError(_non_finite_message(model, first, batch.shape[0], autocast_dtype))
            total_nll += nll
            bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    tokens = windows * (seqlen - 1)
    mean_nll = float(total_nll) / tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,  # exp overflows a float above ~709
        nll=mean_nll,
        windows=windows,
        seqlen=seqlen,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def evaluate_dataset(model, tokenizer, dataset: str, seqlen: int, batch_size: int = 8, split: str = "test",
                     max_windows: int | None = None, progress: bool = False, autocast_dtype=None,
                     cache_dir: str | None = None, *, validation_percent: float = 5.0,
                     flag: str = "--dataset", desc: str = "perplexity", named_file_whole: bool = False) -> PerplexityResult:
    """Perplexity on a named data source (see :mod:`prunetune.data`).

    Args:
        validation_percent: a local source without split files is scored on its held-out
            first percentage of lines/records, never on text a model trained on (0: the whole source).
        flag: the option ``dataset`` came from, named in error messages.
        named_file_whole: a single local file named for evaluation (``test.txt``) is scored whole;
            for callers whose model never trained on it (see :func:`prunetune.data.load_documents`).

    Returns:
        The result, with ``dataset``, ``fingerprint`` and ``text`` (which text it was) set.
    """
    check_model(model)
    require(tokenizer is not None and callable(tokenizer),
            f"tokenizer must be a loaded tokenizer (e.g. from prunetune.load_tokenizer), got {type(tokenizer).__name__}.")
    require(isinstance(dataset, str) and dataset, f"dataset must be a data source name or path, got {dataset!r}.")
    check_window_options(seqlen, batch_size, max_windows)
    check_seqlen(model, seqlen)
    check_validation_percent(validation_percent)
    stream, documents = eval_stream(tokenizer, dataset, seqlen=seqlen, split=split, cache_dir=cache_dir,
                                    validation_percent=validation_percent, flag=flag, named_file_whole=named_file_whole)
    result = perplexity(model, stream, seqlen, batch_size=batch_size, max_windows=max_windows,
                        progress=progress, autocast_dtype=autocast_dtype, desc=desc)
    result.dataset = dataset
    result.fingerprint = documents.fingerprint
    windows = f"first {result.windows} windows of {seqlen} tokens of " if max_windows is not None else ""
    result.text = windows + documents.description
    return result


def _non_finite_message(model, first: int, count: int, autocast_dtype) -> str:
    """Why the logits are NaN/inf: weights that hold NaN/inf, or a forward that overflowed."""
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    bad = [name for name, tensor in tensors if not torch.isfinite(tensor).all()]
    where = f"windows {first}-{first + count - 1}"
    if bad:
        return (f"The model produced NaN/inf logits on {where}: its weights hold NaN/inf ({len(bad)} tensor(s), "
                f"first {bad[0]}). Its perplexity is undefined; check the step that wrote these weights "
                "(a diverged recovery, a float16 overflow) and evaluate a model with finite weights.")
    dtype = autocast_dtype or next(model.parameters()).dtype
    return (f"The model produced NaN/inf logits on {where} although its weights are finite: the forward pass "
            f"overflowed in {str(dtype).replace('torch.', '')}. Evaluate with --dtype float32 (or bfloat16).")


def default_seqlen(model, cap: int = 2048) -> int:
    """The model's context length, capped (the papers evaluate Llama at 2048 or 4096)."""
    limit = max_positions(model)
    return min(limit, cap) if limit else cap


def autocast_for(model) -> torch.dtype | None:
    """Half-precision models run their forward under autocast of their own dtype."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None
