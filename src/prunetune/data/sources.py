"""Data names and paths -> :class:`Documents`: the one dispatch over builtin, hub and local sources.

A *source* is ``builtin``, a hub name (``wikitext2``, ``c4``, ``ptb``), a local folder in one
of those datasets' hub layout (it gets that dataset's protocol), ``ptb:FILE`` (a local PTB
text file read by the papers' ptb protocol), or a local file/folder.

A single local file named for an evaluation split (``test.txt``, ``ptb.valid.txt``) is read whole
for the validation or test split when the caller only evaluates (``named_file_whole``: ``prunetune
eval``, ``prune``'s perplexity): the user named it for evaluation, so holding out its first
percentage (the rule for a file that may also train) would score only part of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from prunetune.data.builtin import builtin_documents
from prunetune.data.documents import Documents
from prunetune.data.hub_sources import (
    HUB_SOURCES,
    HUB_TABLE,
    HubSource,
    hub_layout,
    load_hub,
    load_protocol_file,
    split_protocol,
)
from prunetune.data.local import (
    SPLIT_STEMS,
    _split_path_field,
    describe_kinds,
    file_kind,
    load_local,
)
from prunetune.errors import UsageError, require
from prunetune.hub import looks_like_path

SOURCES = HUB_SOURCES + ("builtin",)
SPLITS = ("train", "validation", "test")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def describe_sources() -> str:
    return (
        f"one of {', '.join(SOURCES)}, or a path to a {describe_kinds()} file "
        "(json/jsonl/parquet: 'path:field' names the text field) or a folder of them; ptb:FILE reads a local PTB "
        "text file by the papers' ptb protocol"
    )


@dataclass(frozen=True)
class SourceRef:
    """What a source string names: ``kind`` is builtin, hub (from the Hub) or local; ``protocol``
    is the hub source whose protocol applies (also to a local folder in its layout)."""

    name: str
    kind: str
    protocol: HubSource | None = None
    root: Path | None = None  # a local folder in the hub layout of ``protocol``
    file: Path | None = None  # ``ptb:FILE``: the local file read by ``protocol``


def resolve(source: str, flag: str | None = None) -> SourceRef:
    """Check ``source`` and say what it names (see :func:`check_source`)."""
    label = f"{flag} {source}" if flag else f"The dataset path {source!r}"
    require(isinstance(source, str) and source.strip(), f"{flag or 'dataset'} {source!r}: give a data source, {describe_sources()}.")
    if source == "builtin":
        return SourceRef(source, "builtin")
    if source in HUB_TABLE:
        return SourceRef(source, "hub", HUB_TABLE[source])
    named = split_protocol(source)
    if named is not None and not Path(source).exists():
        spec, file = named
        if not file.is_file():
            raise UsageError(f"{label}: {file} is not a file. {spec.name}:FILE reads a local text file (one sentence a "
                             f"line, e.g. {spec.name}.test.txt) by the papers' {spec.name} protocol.")
        return SourceRef(source, "local", spec, file=file)
    path, _ = _split_path_field(source)
    if not path.exists():
        if looks_like_path(source) or file_kind(path) is not None:
            raise UsageError(f"{label} does not exist: there is no such file or folder. Accepted: {describe_sources()}.")
        raise UsageError(f"Unknown dataset {source!r}: it is neither a known name nor an existing path. "
                         f"Accepted: {describe_sources()}.")
    if path.is_file() and file_kind(path) is None:
        raise UsageError(f"Cannot read dataset {source!r}: unsupported file type '{''.join(path.suffixes)}'. "
                         f"Accepted: {describe_sources()}.")
    spec = hub_layout(path)
    if spec is not None:
        return SourceRef(source, "local", spec, path)
    return SourceRef(source, "local")


def check_source(source: str, flag: str | None = None) -> None:
    """Raise :class:`UsageError` unless ``source`` names a known source or an existing readable path.

    Args:
        flag: the option the user set it with (``--calib_dataset``), named in the message.
    """
    resolve(source, flag)


def check_local_file(value: str, flag: str, instead: str = "") -> None:
    """Raise :class:`UsageError` unless ``value`` is a local file or folder: a setting that takes a
    file (``--train_file``, a pipeline's ``validation_file``) refuses a source's name, such as ``c4``.

    Args:
        flag: how messages name the setting (``--train_file``, ``config.recover[0].validation_file:``).
        instead: what to use for a named source, appended to the message (``, or use --dataset_name c4``).
    """
    if value in SOURCES and not Path(value).exists():
        raise UsageError(f"{flag} {value!r} names a dataset, not a file: give a local .txt/.jsonl/.json/.parquet "
                         f"file or folder{instead}.")
    check_source(value, flag)


def check_validation_percent(validation_percent) -> None:
    ok = isinstance(validation_percent, (int, float)) and not isinstance(validation_percent, bool)
    require(ok and 0 <= validation_percent < 100,
            f"validation_percent={validation_percent!r}: give the percentage of a local source to hold out for "
            "validation and test, a number from 0 (no hold-out) up to but not including 100.")


def load_documents(source: str, split: str, cache_dir: str | None = None, *, validation_percent: float = 5.0,
                   streaming: bool = False, flag: str = "--dataset", named_file_whole: bool = False) -> Documents:
    """The documents of ``split`` of ``source``.

    Args:
        source: ``builtin``, ``wikitext2``, ``c4``, ``ptb``, or a local file or folder
            (:mod:`prunetune.data.local`; a folder in one of the hub layouts gets that dataset's protocol).
        split: ``train``, ``validation`` or ``test``.
        cache_dir: the ``datasets`` cache (default ``HF_DATASETS_CACHE``).
        validation_percent: for a local source without split files, the held-out first
            percentage of lines/records that ``validation`` and ``test`` read and ``train``
            skips (``run_clm.py``'s ``--validation_split_percentage``); 0: no hold-out.
        streaming: read the rows as a ``datasets.IterableDataset`` without converting the
            source first (hub sources, JSON/Parquet files named by split).
        flag: the option the source came from, named in error messages.
        named_file_whole: a single local file named for evaluation (:func:`named_for_evaluation`)
            is read whole for the validation and test splits; for callers that never train on it.

    Raises:
        UsageError: unknown names, missing or unreadable files, empty data, a hub dataset
            that cannot be had offline.
    """
    require(split in SPLITS, f"Unknown split {split!r}; accepted: {', '.join(SPLITS)}.")
    check_validation_percent(validation_percent)
    ref = resolve(source, flag)
    if ref.kind == "builtin":
        return builtin_documents(split)
    if ref.file is not None:
        whole = named_file_whole and split != "train"  # ptb:FILE names a file for evaluation
        return load_protocol_file(ref.protocol, ref.file, split, source, 0.0 if whole else validation_percent)
    if ref.protocol is not None:
        return load_hub(ref.protocol, split, source, cache_dir, ref.root, streaming, flag)
    path, _ = _split_path_field(source)
    if named_file_whole and split != "train" and validation_percent > 0 and path.is_file() and named_for_evaluation(path):
        documents = load_local(source, split, cache_dir, 0, streaming)
        return dataclasses.replace(documents, description=documents.description.replace(
            "no held-out part: validation_percent=0", "the file is named for evaluation, so none of it is held out"))
    return load_local(source, split, cache_dir, validation_percent, streaming)


def named_for_evaluation(path: Path) -> bool:
    """A file whose name marks it as evaluation text: a dot-separated part is test, validation, valid or val."""
    parts = path.name.lower().split(".")
    return any(part in SPLIT_STEMS["validation"] + SPLIT_STEMS["test"] for part in parts[:-1])
