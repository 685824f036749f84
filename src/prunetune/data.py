"""Data sources: one place that turns a data name into token streams.

A *source* is one of

* ``wikitext2``, ``c4``, ``ptb``: Hub datasets read through ``datasets`` with the files,
  splits and joining of the Wanda / SparseGPT papers (``datasets`` is imported only here,
  and only when one of these is asked for);
* ``builtin``: the standard-library sources of the running interpreter, an offline corpus
  every Python install has (tests and site-packages excluded, sorted, split by file);
* a local path: a ``.txt``, ``.jsonl``/``.json`` (field ``text``, or ``path:field``),
  ``.parquet`` file, or a folder of such files (``train.*``/``validation.*``/``test.*``
  files give the splits; otherwise every file serves every split).

Three views are built from a source:

* :func:`calibration_samples` -- ``n`` seeded random windows of ``seqlen`` tokens;
* :func:`eval_stream` -- one long token stream for perplexity;
* :func:`training_blocks` -- fixed-size blocks for causal-LM training (tokenize + group,
  as ``run_clm.py`` does).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from prunetune.errors import UsageError

HUB_SOURCES = ("wikitext2", "c4", "ptb")
SOURCES = HUB_SOURCES + ("builtin",)
SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# The C4 shards the papers use (en/ train shard 0 for calibration, validation shard 0 for
# evaluation). The old "allenai--c4" config name no longer exists on the Hub, so the files
# are named explicitly.
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
C4_EVAL_DOCUMENTS = 1100  # SparseGPT/Wanda: first 1100 validation documents ...
C4_EVAL_WINDOWS = 256  # ... joined and cut to 256 x seqlen tokens

# builtin corpus split, by a hash of each file's path: stable across runs and machines.
_BUILTIN_BUCKETS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Documents:
    """The texts of one split of one source.

    Attributes:
        source: the name or path the user gave.
        split: ``train``, ``validation`` or ``test``.
        texts: the documents, in order.
        joiner: the string placed between documents when they form one stream.
        fingerprint: sha256 (first 16 hex digits) of the texts, to record with results.
    """

    source: str
    split: str
    texts: tuple[str, ...]
    joiner: str
    fingerprint: str

    def joined(self) -> str:
        return self.joiner.join(self.texts)


def _fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def describe_sources() -> str:
    return (
        f"one of {', '.join(SOURCES)}, or a path to a {'/'.join(TEXT_SUFFIXES)} file "
        "(json/jsonl: 'path:field' names the text field) or a folder of them"
    )


# --------------------------------------------------------------------------- builtin


def builtin_files() -> list[tuple[str, Path]]:
    """Standard-library source files of this interpreter: (relative path, path), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0] in ("site-packages", "dist-packages"):
            continue
        if _TEST_DIRS.intersection(parts[:-1]) or parts[-1].startswith("test_"):
            continue
        files.append((rel.as_posix(), path))
    files.sort()
    return files


def _builtin_bucket(relative_path: str) -> int:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100


@functools.lru_cache(maxsize=8)
def _builtin_documents(split: str) -> Documents:
    texts = []
    for rel, path in builtin_files():
        if _builtin_bucket(rel) in _BUILTIN_BUCKETS[split]:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return Documents("builtin", split, tuple(texts), "\n\n", _fingerprint(texts))


# --------------------------------------------------------------------------- local files


def _split_path_field(source: str) -> tuple[Path, str]:
    """``data.jsonl:body`` -> (Path('data.jsonl'), 'body'); plain paths get field 'text'."""
    path, field = source, "text"
    head, sep, tail = source.rpartition(":")
    if sep and head and not Path(source).exists() and Path(head).exists() and "/" not in tail:
        path, field = head, tail
    return Path(path).expanduser(), field


def _read_text_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = [path.read_text(encoding="utf-8")]
        elif suffix in (".jsonl", ".json"):
            raw = path.read_text(encoding="utf-8")
            if suffix == ".json" and raw.lstrip().startswith("["):
                rows = json.loads(raw)
            else:
                rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            texts = []
            for number, row in enumerate(rows, 1):
                if not isinstance(row, dict) or field not in row:
                    raise UsageError(
                        f"Record {number} of {path} has no '{field}' field. Each JSON record "
                        f"must be an object with a '{field}' string; name another field with "
                        f"'{path}:FIELD'."
                    )
                texts.append(str(row[field]))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # only needed for parquet input

            table = pq.read_table(path)
            if field not in table.column_names:
                raise UsageError(
                    f"{path} has no column '{field}' (columns: {', '.join(table.column_names)}). "
                    f"Name the text column with '{path}:COLUMN'."
                )
            texts = [str(t) for t in table.column(field).to_pylist() if t is not None]
        else:
            raise UsageError(
                f"Cannot read {path}: unsupported file type '{suffix}'. Accepted: "
                f"{', '.join(TEXT_SUFFIXES)}."
            )
    except UsageError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"Cannot read the text file {path}: {err}. Give a readable UTF-8 file.") from err
    return texts


def _local_documents(source: str, split: str) -> Documents:
    path, field = _split_path_field(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        split_names = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
        named = [p for p in files if p.stem.lower().split(".")[0] in split_names[split]]
        any_split_named = any(
            p.stem.lower().split(".")[0] in sum(split_names.values(), ()) for p in files
        )
        if any_split_named:
            if not named:
                raise UsageError(
                    f"The folder {path} has split files but none for the '{split}' split. "
                    f"Add a file named {split_names[split][0]}.txt (or .jsonl/.json/.parquet)."
                )
            files = named
        if not files:
            raise UsageError(
                f"The folder {path} holds no text files. Accepted file types: {', '.join(TEXT_SUFFIXES)}."
            )
    else:
        files = [path]
    texts = [text for file in files for text in _read_text_file(file, field)]
    if not any(t.strip() for t in texts):
        raise UsageError(f"The data source {source} is empty: it holds no text to read.")
    return Documents(source, split, tuple(texts), "\n\n", _fingerprint(texts))


# --------------------------------------------------------------------------- hub


def _load_hub_dataset(*args, **kwargs):
    """``datasets.load_dataset`` with a clear error when the library or the Hub is missing."""
    try:
        import datasets  # imported lazily: prunetune works without it on local data
    except ImportError as err:
        raise UsageError(
            "Reading a Hub dataset needs the 'datasets' package, which is not installed. "
            "Install it with `pip install datasets`, or use --dataset builtin or a local file."
        ) from err
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # network errors surface as many different types
        raise UsageError(
            f"Could not load the Hub dataset {args[0]!r} ({type(err).__name__}: {err}). The Hub "
            "may be unreachable from this machine: use a local file (.txt/.jsonl/.json/.parquet) "
            "or 'builtin' instead, or set HF_DATASETS_CACHE to a cache that holds it."
        ) from err


def _hub_documents(source: str, split: str, cache_dir: str | None) -> Documents:
    if source == "wikitext2":
        hub_split = {"validation": "validation"}.get(split, split)
        rows = _load_hub_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split, cache_dir=cache_dir)
        texts = list(rows["text"])
        # The papers join WikiText-2 test with "\n\n" and train with " ".
        joiner = " " if split == "train" else "\n\n"
    elif source == "ptb":
        rows = _load_hub_dataset("ptb_text_only", "penn_treebank", split=split, cache_dir=cache_dir)
        texts = list(rows["sentence"])
        joiner = " "
    elif source == "c4":
        shard = "train" if split == "train" else "validation"
        rows = _load_hub_dataset(
            "allenai/c4", data_files={shard: C4_FILES[shard]}, split=shard, cache_dir=cache_dir
        )
        if shard == "validation":
            rows = rows.select(range(min(C4_EVAL_DOCUMENTS, len(rows))))
        texts = list(rows["text"])
        joiner = " "
    else:  # pragma: no cover - guarded by resolve
        raise AssertionError(source)
    return Documents(source, split, tuple(texts), joiner, _fingerprint(texts))


# --------------------------------------------------------------------------- public


def check_source(source: str) -> None:
    """Raise :class:`UsageError` unless ``source`` names a known source or an existing path."""
    if source in SOURCES:
        return
    path, _ = _split_path_field(source)
    if not path.exists():
        raise UsageError(f"Unknown dataset {source!r}: it is neither a known name nor an existing path. Accepted: {describe_sources()}.")
    if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES:
        raise UsageError(f"Cannot read dataset {source!r}: unsupported file type '{path.suffix}'. Accepted: {describe_sources()}.")


def load_documents(source: str, split: str, cache_dir: str | None = None) -> Documents:
    """The documents of ``split`` of ``source`` (see the module docstring for names)."""
    if split not in SPLITS:
        raise UsageError(f"Unknown split {split!r}; accepted: {', '.join(SPLITS)}.")
    check_source(source)
    if source == "builtin":
        return _builtin_documents(split)
    if source in HUB_SOURCES:
        return _hub_documents(source, split, cache_dir)
    return _local_documents(source, split)


def _tokenizer_key(tokenizer) -> str:
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def tokenize_stream(tokenizer, documents: Documents) -> torch.Tensor:
    """The joined documents as one (1, N) stream of token ids."""
    return _tokenize_cached(_tokenizer_key(tokenizer), tokenizer, documents)


@functools.lru_cache(maxsize=16)
def _tokenize_cached_inner(key: str, documents: Documents, tokenizer_ref) -> torch.Tensor:
    tokenizer = tokenizer_ref()
    ids = tokenizer(documents.joined(), return_tensors="pt", add_special_tokens=True).input_ids
    return ids


def _tokenize_cached(key: str, tokenizer, documents: Documents) -> torch.Tensor:
    # lru_cache hashes its arguments: key by tokenizer identity, documents by value.
    return _tokenize_cached_inner(key, documents, _Ref(tokenizer))


class _Ref:
    """Hashable by the tokenizer key only, so the cache does not depend on object identity."""

    def __init__(self, obj):
        self.obj = obj
        self.key = _tokenizer_key(obj)

    def __call__(self):
        return self.obj

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Ref) and other.key == self.key


def calibration_samples(
    tokenizer,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    cache_dir: str | None = None,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the train split, shape (n, seqlen).

    C4 follows the papers: each sample comes from a random document longer than ``seqlen``.
    Every other source draws windows from the joined train stream. Seeded and reproducible.

    Raises:
        UsageError: if the data holds fewer than ``nsamples * seqlen`` tokens.
    """
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must both be positive integers.")
    documents = load_documents(source, "train", cache_dir)
    rng = random.Random(seed)
    if source == "c4":
        samples = []
        texts = documents.texts
        for _ in range(nsamples):
            for _attempt in range(100_000):
                ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], return_tensors="pt").input_ids
                if ids.shape[1] > seqlen:
                    break
            else:
                raise UsageError(f"No C4 document is longer than seqlen={seqlen} tokens; lower --seqlen.")
            start = rng.randint(0, ids.shape[1] - seqlen - 1)
            samples.append(ids[:, start : start + seqlen])
        return torch.cat(samples, dim=0)
    stream = tokenize_stream(tokenizer, documents)
    available = stream.shape[1]
    if available < nsamples * seqlen or available <= seqlen:
        raise UsageError(
            f"Calibration asks for {nsamples} x {seqlen} = {nsamples * seqlen} tokens, but the "
            f"train split of {source!r} holds only {available} tokens. Lower --nsamples or "
            f"--seqlen, or give more data."
        )
    starts = [rng.randint(0, available - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[0, s : s + seqlen] for s in starts])


def eval_stream(
    tokenizer,
    source: str,
    seqlen: int | None = None,
    split: str = "test",
    cache_dir: str | None = None,
) -> tuple[torch.Tensor, Documents]:
    """The evaluation token stream (1, N) and the documents it came from.

    C4 evaluation uses the validation shard (first 1100 documents) cut to 256 x seqlen
    tokens, as in the papers; every other source uses ``split`` (default test) whole.
    """
    if source == "c4":
        split = "validation"
    documents = load_documents(source, split, cache_dir)
    stream = tokenize_stream(tokenizer, documents)
    if source == "c4" and seqlen:
        stream = stream[:, : C4_EVAL_WINDOWS * seqlen]
    return stream, documents


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-size causal-LM blocks: ``{"input_ids": (block,), "labels": (block,)}``."""

    def __init__(self, blocks: torch.Tensor, fingerprint: str):
        self.blocks = blocks  # (n_blocks, block_size)
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


def training_blocks(
    tokenizer,
    source: str,
    block_size: int,
    split: str = "train",
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> BlockDataset:
    """Tokenize every document, concatenate, cut into ``block_size`` blocks (remainder dropped).

    Mirrors ``run_clm.py``'s group_texts: documents are tokenized separately (each with the
    tokenizer's special tokens) and concatenated, so blocks cross document boundaries.
    """
    documents = load_documents(source, split, cache_dir)
    stream = _document_token_stream(_Ref(tokenizer), documents)
    n_blocks = stream.numel() // block_size
    if n_blocks == 0:
        raise UsageError(
            f"The {split} split of {source!r} holds {stream.numel()} tokens, fewer than one block "
            f"of {block_size}. Lower --block_size or give more data."
        )
    if max_samples is not None:
        n_blocks = min(n_blocks, max_samples)
    blocks = stream[: n_blocks * block_size].view(n_blocks, block_size)
    return BlockDataset(blocks, documents.fingerprint)


@functools.lru_cache(maxsize=8)
def _document_token_stream(tokenizer_ref: _Ref, documents: Documents) -> torch.Tensor:
    tokenizer = tokenizer_ref()
    encoded = tokenizer(list(documents.texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in encoded:
        ids.extend(doc)
        if eos is not None and (not doc or doc[-1] != eos):
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
