"""Token ids of documents, tokenized with ``Dataset.map(batched=True)`` into an on-disk Arrow cache.

Two tokenizations, each as the papers and the bundled model's tables have them:

* :func:`tokenize_stream` -- the documents joined with the source's joiner and tokenized in
  one call (special tokens once, at the start): calibration windows and evaluation;
* :func:`document_tokens` -- each document tokenized on its own (with the tokenizer's
  special tokens) and followed by EOS: training blocks.

Cache files live in ``<cache_dir or HF_DATASETS_CACHE>/prunetune-tokens/``, written by
``Dataset.map`` (to a temporary file renamed into place, so a reader never sees half a file)
and read back memory-mapped: a second call, or a second DDP rank, reads the ids instead of
tokenizing again, and the ids are never a Python list. A file's name is a key over everything
that decides its ids: the tokenizer's content (:func:`tokenizer_fingerprint`, not its name),
the text (``Documents.content_key``) and how it is tokenized. The cache is the caller's to
clear (``rm -r``); nothing is kept in memory between calls.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from prunetune.data.documents import TEXT, Documents, key_of

logger = logging.getLogger(__name__)

CACHE_FOLDER = "prunetune-tokens"
CHUNK_DOCUMENTS = 10_000  # documents per cache file: training stops tokenizing once enough blocks exist
KEY_LENGTH = 40  # hex digits of a key in file names (datasets allows 64)
# Settings that decide a document's ids: BOS/EOS handling (the EOS id appended to every training
# document among them), and whether special tokens written in the text stay one id (split_special_tokens).
_SETTINGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case", "legacy", "bos_token_id",
             "eos_token_id", "unk_token_id", "pad_token_id", "split_special_tokens", "all_special_ids")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its full definition and special-token settings.

    A fast tokenizer's definition is ``backend_tokenizer.to_str()`` (vocabulary, merges,
    normalizer, pre-tokenizer and the post-processor that adds BOS/EOS); a slow one's is its
    vocabulary file (or vocabulary) and added tokens. Two tokenizers that differ only in BOS
    handling differ here, unlike a key built from the class, name and length.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            definition = hashlib.sha256(Path(vocab_file).read_bytes()).hexdigest()
        else:
            definition = json.dumps(sorted(tokenizer.get_vocab().items()))
        definition += json.dumps(sorted(tokenizer.get_added_vocab().items()))
    settings = {name: getattr(tokenizer, name, None) for name in _SETTINGS}
    settings["class"] = type(tokenizer).__name__
    settings["special_tokens"] = {name: str(value) for name, value in tokenizer.special_tokens_map.items()}
    return key_of("tokenizer v1", definition, json.dumps(settings, sort_keys=True, default=str))


def cache_folder(cache_dir: str | None = None) -> Path:
    import datasets.config

    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / CACHE_FOLDER


def _encode(batch: dict, tokenizer, append_eos: bool) -> dict:
    ids = tokenizer(batch[TEXT], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if append_eos and eos is not None:
        for document in ids:  # a document boundary the model can see (run_clm.py adds none)
            if not document or document[-1] != eos:
                document.append(eos)
    return {"input_ids": ids}


def _tokenized(texts_factory, path: Path, tokenizer, append_eos: bool, desc: str):
    """The cache file at ``path`` (memory-mapped), written first by ``Dataset.map`` if missing or unreadable."""
    import datasets

    if path.is_file():
        try:
            return datasets.Dataset.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file (cut short by a full disk, say): tokenize again
            logger.warning("token cache %s is unreadable (%s); tokenizing again", path, err)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = texts_factory()
    sequence = getattr(datasets, "List", None) or datasets.Sequence  # datasets 4 renamed Sequence to List
    features = datasets.Features({"input_ids": sequence(datasets.Value("int32"))})
    return texts.map(partial(_encode, tokenizer=tokenizer, append_eos=append_eos), batched=True,
                     remove_columns=texts.column_names, features=features, cache_file_name=str(path),
                     new_fingerprint=path.stem[-64:], load_from_cache_file=False, desc=desc)


def _segments(tokenized) -> list[np.ndarray]:
    """The ids of a cache file as int32 arrays viewing its memory map (no copy)."""
    if len(tokenized) == 0:  # datasets maps an empty chunk (past the end) to a table without the column
        return []
    column = tokenized.data.column("input_ids")
    return [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in column.chunks if len(chunk)]


def tokenize_stream(tokenizer, documents: Documents, cache_dir: str | None = None) -> torch.Tensor:
    """The joined documents as one (1, N) stream of token ids (int64), cached on disk."""
    import datasets

    key = key_of("stream v1", tokenizer_fingerprint(tokenizer), documents.content_key, documents.joiner)
    path = cache_folder(cache_dir) / f"stream-{key[:KEY_LENGTH]}.arrow"
    tokenized = _tokenized(lambda: datasets.Dataset.from_dict({TEXT: [documents.joined()]}), path, tokenizer,
                           append_eos=False, desc=f"tokenizing {documents.description}")
    segments = _segments(tokenized)
    ids = np.concatenate(segments) if segments else np.zeros(0, dtype=np.int32)
    return torch.from_numpy(ids.astype(np.int64)).unsqueeze(0)


class TokenStream:
    """Consecutive token ids held as int32 arrays that view memory-mapped cache files."""

    def __init__(self, segments: list[np.ndarray], owners: list | None = None):
        self.segments = [s for s in segments if len(s)]
        self.owners = owners or []  # the datasets whose memory maps the segments view
        self.offsets = np.cumsum([0] + [len(s) for s in self.segments]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        """Pickled as the cache files it views (DataLoader workers, spawned processes), not as copies of the ids."""
        return {"owners": self.owners}

    def __setstate__(self, state: dict) -> None:
        self.__init__([s for owner in state["owners"] for s in _segments(owner)], state["owners"])

    def take(self, start: int, stop: int) -> np.ndarray:
        """Ids ``start..stop`` (a view when they lie in one segment, else a copy)."""
        index = bisect.bisect_right(self.offsets, start) - 1
        pieces = []
        while start < stop:
            segment, local = self.segments[index], start - self.offsets[index]
            piece = segment[local : local + (stop - start)]
            pieces.append(piece)
            start += len(piece)
            index += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def document_tokens(tokenizer, documents: Documents, cache_dir: str | None = None,
                    min_tokens: int | None = None) -> TokenStream:
    """Each document's ids followed by EOS, concatenated; tokenizing stops once ``min_tokens`` exist.

    Documents are tokenized :data:`CHUNK_DOCUMENTS` at a time, one cache file per chunk, in
    order: a call that needs 30,000 blocks of C4 tokenizes about 70,000 of its 356,000
    documents, and a later call needing more continues where the files end.
    """
    key = key_of("documents+eos v1", tokenizer_fingerprint(tokenizer), documents.content_key, CHUNK_DOCUMENTS)
    folder = cache_folder(cache_dir)
    reader = _ChunkReader(documents, CHUNK_DOCUMENTS)
    segments, owners, total, index = [], [], 0, 0
    while min_tokens is None or total < min_tokens:
        path = folder / f"documents-{key[:KEY_LENGTH]}-{index:05d}.arrow"
        tokenized = _tokenized(partial(reader.chunk, index), path, tokenizer, append_eos=True,
                               desc=f"tokenizing {documents.description}, documents {index * CHUNK_DOCUMENTS:,}+")
        owners.append(tokenized)
        for segment in _segments(tokenized):
            segments.append(segment)
            total += len(segment)
        if len(tokenized) < CHUNK_DOCUMENTS:  # the last chunk
            break
        index += 1
    return TokenStream(segments, owners)


class _ChunkReader:
    """Chunks of ``size`` documents as datasets, read only when a cache file is missing.

    A streamed source is read forward from the first missing chunk; a chunk past the end is empty.
    """

    def __init__(self, documents: Documents, size: int):
        self.documents, self.size = documents, size
        self.batches, self.next_index = None, 0

    def chunk(self, index: int):
        import datasets

        rows = self.documents.rows
        if not self.documents.streaming:
            first, total = index * self.size, len(rows)
            return rows.select(range(first, min(first + self.size, total)) if first < total else [])
        if self.batches is None or index < self.next_index:
            self.batches, self.next_index = rows.skip(index * self.size).iter(batch_size=self.size), index
        texts = []
        while self.next_index <= index:
            texts = next(self.batches, {TEXT: []})[TEXT]
            self.next_index += 1
        return datasets.Dataset.from_dict({TEXT: texts}, features=datasets.Features({TEXT: datasets.Value("string")}))
