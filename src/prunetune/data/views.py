"""The three views models need: calibration windows, an evaluation stream, training blocks.

Each takes a tokenizer and a source (see :func:`prunetune.data.load_documents`) and keeps the
papers' protocols exactly, so the bundled model's ids, and the README's numbers, do not move:

* :func:`calibration_samples` -- ``n`` windows of ``seqlen`` tokens drawn with
  ``random.Random(seed)``: for C4 each from a random document longer than ``seqlen``, for
  every other source from the joined train stream;
* :func:`eval_stream` -- one long stream for perplexity (C4: validation shard 0, first 1100
  documents joined with ``" "``, cut to 256 x seqlen tokens);
* :func:`training_blocks` -- fixed-size blocks for causal-LM training.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from prunetune.data.documents import TEXT, Documents, key_of
from prunetune.data.sources import check_validation_percent, load_documents, resolve
from prunetune.data.tokens import (
    TokenStream,
    document_tokens,
    tokenize_stream,
    tokenizer_fingerprint,
)
from prunetune.errors import UsageError

C4_ATTEMPTS = 100_000  # documents drawn per sample before giving up on finding one longer than seqlen


def calibration_samples(
    tokenizer,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    cache_dir: str | None = None,
    *,
    validation_percent: float = 5.0,
    flag: str = "--calib_dataset",
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split, shape (n, seqlen).

    C4 (and a local copy in its layout) follows the papers: each sample is a random window
    of a random document longer than ``seqlen``. Every other source draws windows from the
    joined train stream. Seeded with ``random.Random(seed)`` and reproducible.

    Args:
        validation_percent: a local source without split files calibrates on what is left
            after holding this percentage out (see :func:`prunetune.data.load_documents`).
        flag: the option the source came from, named in error messages.

    Raises:
        UsageError: if the data holds fewer than ``nsamples * seqlen`` tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must both be positive integers.")
    documents = load_documents(source, "train", cache_dir, validation_percent=validation_percent, flag=flag)
    rng = random.Random(seed)
    if documents.protocol is not None and documents.protocol.documents_for_calibration:
        return _document_windows(tokenizer, documents, nsamples, seqlen, rng)
    stream = tokenize_stream(tokenizer, documents, cache_dir)
    available = stream.shape[1]
    if available < nsamples * seqlen or available <= seqlen:
        raise UsageError(
            f"Calibration asks for {nsamples} x {seqlen} = {nsamples * seqlen} tokens, but the "
            f"train split of {source!r} ({documents.description}) holds only {available} tokens. "
            "Lower --nsamples or --seqlen, or give more data."
        )
    starts = [rng.randint(0, available - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[0, s : s + seqlen] for s in starts])


def _document_windows(tokenizer, documents: Documents, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """The C4 sampler of the Wanda / SparseGPT code, draw for draw."""
    rows, samples = documents.rows, []
    for _ in range(nsamples):
        for _attempt in range(C4_ATTEMPTS):
            ids = tokenizer(rows[rng.randint(0, len(rows) - 1)][TEXT], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        else:
            raise UsageError(f"No document of {documents.description} is longer than seqlen={seqlen} tokens; lower --seqlen.")
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        samples.append(ids[:, start : start + seqlen])
    return torch.cat(samples, dim=0)


def eval_stream(
    tokenizer,
    source: str,
    seqlen: int | None = None,
    split: str = "test",
    cache_dir: str | None = None,
    *,
    validation_percent: float = 5.0,
    flag: str = "--dataset",
    named_file_whole: bool = False,
) -> tuple[torch.Tensor, Documents]:
    """The evaluation token stream (1, N) and the documents it came from.

    C4 evaluation uses the validation shard (first 1100 documents) cut to 256 x seqlen
    tokens, as in the papers; every other source uses ``split`` (default test) whole. The
    returned documents' ``description`` says which text the stream is (the cut included).

    Args:
        validation_percent: a local source without split files evaluates its held-out
            first percentage of lines/records (see :func:`prunetune.data.load_documents`).
        flag: the option the source came from, named in error messages.
        named_file_whole: score a single local file named for evaluation (``test.txt``) whole
            (see :func:`prunetune.data.load_documents`).
    """
    protocol = resolve(source, flag).protocol
    if protocol is not None and protocol.eval_split:
        split = protocol.eval_split
    documents = load_documents(source, split, cache_dir, validation_percent=validation_percent, flag=flag,
                               named_file_whole=named_file_whole)
    stream = tokenize_stream(tokenizer, documents, cache_dir)
    if protocol is not None and protocol.eval_windows and seqlen:
        stream = stream[:, : protocol.eval_windows * seqlen]
        cut = f", cut to {protocol.eval_windows} x {seqlen} tokens"
        documents = dataclasses.replace(documents, description=documents.description + cut)
    return stream, documents


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-size causal-LM blocks: ``{"input_ids": (block,), "labels": (block,)}``, int64.

    What the ``Trainer`` takes with ``default_data_collator``. Built by :func:`training_blocks`
    over memory-mapped token files (a block is copied out only when asked for), or from a
    tensor of blocks.

    Attributes:
        fingerprint: identifies the blocks (tokenizer, text, block size, count).
        description: which text the blocks come from.
    """

    def __init__(self, blocks: torch.Tensor, fingerprint: str, description: str = ""):
        self._tensor = blocks  # (n_blocks, block_size)
        self._stream: TokenStream | None = None
        self.n_blocks, self.block_size = blocks.shape
        self.fingerprint, self.description = fingerprint, description

    @classmethod
    def from_stream(cls, stream: TokenStream, n_blocks: int, block_size: int, fingerprint: str,
                    description: str = "") -> BlockDataset:
        """The first ``n_blocks`` blocks of ``block_size`` consecutive ids of ``stream``."""
        dataset = cls.__new__(cls)
        dataset._tensor, dataset._stream = None, stream
        dataset.n_blocks, dataset.block_size = n_blocks, block_size
        dataset.fingerprint, dataset.description = fingerprint, description
        return dataset

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.n_blocks <= index < self.n_blocks:
            raise IndexError(f"block {index} of {self.n_blocks}")
        index %= self.n_blocks
        if self._tensor is not None:
            ids = self._tensor[index]
        else:
            start = index * self.block_size
            ids = torch.from_numpy(self._stream.take(start, start + self.block_size).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def blocks(self) -> torch.Tensor:
        """All blocks as one (n_blocks, block_size) tensor (reads them all into memory)."""
        if self._tensor is not None:
            return self._tensor
        ids = self._stream.take(0, self.n_blocks * self.block_size) if self.n_blocks else np.zeros(0, np.int64)
        return torch.from_numpy(ids.astype(np.int64)).view(self.n_blocks, self.block_size)


def training_blocks(
    tokenizer,
    source: str,
    block_size: int,
    split: str = "train",
    max_samples: int | None = None,
    cache_dir: str | None = None,
    *,
    validation_percent: float = 5.0,
    streaming: bool = False,
    flag: str = "--dataset_name",
) -> BlockDataset:
    """Tokenize each document, append EOS, concatenate, cut into ``block_size`` blocks (remainder dropped).

    Like ``run_clm.py``'s tokenize + ``group_texts`` -- documents are tokenized separately
    with the tokenizer's special tokens and concatenated, so blocks cross document
    boundaries -- with two differences: an EOS follows every document (``run_clm.py`` adds
    none, so its documents run into each other unmarked; prunetune's bundled model and
    tables were trained this way), and only the end of the whole stream is dropped, not the
    end of every batch of 1,000 documents.

    The ids are tokenized with ``Dataset.map(batched=True)`` into a memory-mapped on-disk
    cache (:mod:`prunetune.data.tokens`), in chunks of documents, stopping as soon as
    ``max_samples`` blocks exist; a second call reads the cache. Under DDP, let the main
    process tokenize first and the other ranks read its cache::

        with training_args.main_process_first(desc="training blocks"):
            train_data = training_blocks(tokenizer, ...)

    Args:
        split: the split to read (``train``).
        max_samples: the first blocks only (``run_clm.py``'s ``--max_train_samples``).
        cache_dir: the ``datasets`` cache, also for the token files.
        validation_percent: a local source without split files trains on what is left
            after holding this percentage out (see :func:`prunetune.data.load_documents`).
        streaming: read the source as a stream (hub sources, JSON/Parquet files named by
            split) instead of converting it first: for sources too large to store.
        flag: the option the source came from, named in error messages.

    Raises:
        UsageError: bad source, or fewer tokens than one block.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise UsageError(f"block_size={block_size!r}: give a positive integer number of tokens per block.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UsageError(f"max_samples={max_samples!r}: give a positive integer number of blocks, or None for all.")
    check_validation_percent(validation_percent)
    documents = load_documents(source, split, cache_dir, validation_percent=validation_percent,
                               streaming=streaming, flag=flag)
    stream = document_tokens(tokenizer, documents, cache_dir,
                             min_tokens=max_samples * block_size if max_samples is not None else None)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise UsageError(
            f"The {split} split of {source!r} ({documents.description}) holds {len(stream)} tokens, fewer than one "
            f"block of {block_size}. Lower --block_size or give more data."
        )
    if max_samples is not None:
        n_blocks = min(n_blocks, max_samples)
    fingerprint = key_of("blocks v1", tokenizer_fingerprint(tokenizer), documents.content_key, block_size, n_blocks)[:16]
    description = f"{documents.description}: {n_blocks:,} blocks of {block_size} tokens"
    return BlockDataset.from_stream(stream, n_blocks, block_size, fingerprint, description)
