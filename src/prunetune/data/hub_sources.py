"""The Hub datasets of the Wanda / SparseGPT papers, one `HubSource` each, loaded by one function.

Each entry says where the files are (repository, file per split, revision), which column
holds the text, how documents are joined, and which parts of the papers' protocol apply:

* ``c4``: train shard 0 for calibration, each sample a random window of a random document
  longer than ``seqlen``; evaluation on validation shard 0, first 1100 documents, joined
  with ``" "`` and cut to 256 x ``seqlen`` tokens;
* ``wikitext2`` (raw): test joined with ``"\\n\\n"``, train with ``" "``;
* ``ptb``: sentences joined with ``" "``; ``ptb:FILE`` applies it to a local copy of a PTB text
  file (``ptb.test.txt``: one sentence a line), each line stripped as the Hub's ``ptb_text_only``
  loader does, so a local file gives the papers' numbers (scored as plain text it would not);
  the hold-out rule of a single local file applies unless the caller only evaluates.

The files load through ``datasets.load_dataset(<repo>, data_files=...)``. With ``root`` (a
local folder in the repository's own layout, e.g. ``root/en/c4-train.00000-of-01024.json.gz``)
the same files load from disk through the matching builder and the same protocol applies:
tests use it, and so can a machine with a local copy of the files.

Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable as :mod:`prunetune.hub` decides), ``load_dataset`` runs in datasets' offline mode, so it reads its cache without
retrying the network, and a dataset the cache lacks is one message naming the user's flag.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from prunetune.data.documents import TEXT, Documents, key_of, texts_digest
from prunetune.data.local import digest_memo, file_digest, held_out_count
from prunetune.errors import UsageError
from prunetune.hub import offline_error, offline_reason


@dataclass(frozen=True)
class HubSource:
    """Where a hub dataset's files are and which protocol its papers use."""

    name: str
    repo: str
    files: dict[str, str]  # split -> file in the repository
    column: str  # the text column
    joiner: str
    train_joiner: str | None = None  # WikiText-2 joins train with " " but test with "\n\n"
    revision: str | None = None
    max_documents: dict[str, int] = field(default_factory=dict)  # split -> first N documents
    documents_for_calibration: bool = False  # C4: each window from one random long-enough document
    eval_split: str | None = None  # evaluation always reads this split (C4: validation)
    eval_windows: int | None = None  # ... cut to eval_windows x seqlen tokens (C4: 256)
    note: dict[str, str] = field(default_factory=dict)  # split -> what the file is, for descriptions

    def joiner_for(self, split: str) -> str:
        return self.train_joiner if split == "train" and self.train_joiner is not None else self.joiner


C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
HUB_TABLE = {
    "wikitext2": HubSource(
        name="wikitext2", repo="Salesforce/wikitext", column="text", joiner="\n\n", train_joiner=" ",
        files={split: f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet" for split in ("train", "validation", "test")},
    ),
    "c4": HubSource(
        # The old "allenai--c4" config no longer exists on the Hub, so the shards are named explicitly.
        name="c4", repo="allenai/c4", column="text", joiner=" ",
        files={"train": "en/c4-train.00000-of-01024.json.gz", "validation": C4_VALIDATION, "test": C4_VALIDATION},
        max_documents={"validation": 1100, "test": 1100},  # SparseGPT/Wanda: first 1100 validation documents
        documents_for_calibration=True, eval_split="validation", eval_windows=256,
        note={"train": "train shard 0", "validation": "validation shard 0", "test": "validation shard 0 (C4 has no test split)"},
    ),
    "ptb": HubSource(
        # ptb_text_only is a script dataset, which datasets >= 4 no longer runs: read the Hub's Parquet export of it.
        name="ptb", repo="ptb-text-only/ptb_text_only", column="sentence", joiner=" ", revision="refs/convert/parquet",
        files={split: f"penn_treebank/{split}/0000.parquet" for split in ("train", "validation", "test")},
    ),
}
HUB_SOURCES = tuple(HUB_TABLE)
# Protocols a single local file can be read by, as "NAME:FILE" (one sentence a line, stripped).
LINE_PROTOCOLS = ("ptb",)


def split_protocol(source: str) -> tuple[HubSource, Path] | None:
    """``ptb:data/ptb.test.txt`` -> (the ptb protocol, the file); None for any other source string."""
    name, sep, rest = source.partition(":")
    if sep and name in LINE_PROTOCOLS and rest:
        return HUB_TABLE[name], Path(rest).expanduser()
    return None


def load_protocol_file(spec: HubSource, path: Path, split: str, source: str, validation_percent: float = 0.0) -> Documents:
    """A local text file read by a hub source's protocol: a document per line, stripped, joined with its joiner.

    Args:
        validation_percent: 0 (what ``prunetune eval`` asks for): every split is the whole file, the user
            named it. Otherwise, as for any single local file, validation and test are the first
            percentage of lines and train the rest, so a run that trains on it never scores its training text.
    """
    import datasets

    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]  # ptb_text_only's loader: line.strip() per sentence
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"Cannot read {source}: {path} is not a readable UTF-8 text file ({err}).") from err
    if not any(lines):
        raise UsageError(f"The data source {source} is empty: {path} holds no text to read.")
    total, part = len(lines), f"whole ({len(lines):,} lines)"
    if validation_percent > 0:
        held = held_out_count(total, validation_percent)
        lines = lines[held:] if split == "train" else lines[:held]
        part = (f"lines {held + 1:,}-{total:,} ({total - held:,} of {total:,}; the first {validation_percent:g}% are held out)"
                if split == "train" else f"held-out first {validation_percent:g}% of lines ({held:,} of {total:,})")
    rows = datasets.Dataset.from_dict({TEXT: lines})
    joiner = spec.joiner_for(split)
    description = f"{path}, {part} by the papers' {spec.name} protocol (each line stripped, joined with {joiner!r})"
    key = key_of("protocol file v1", spec.name, joiner, texts_digest(lines))
    return Documents(source, split, rows, joiner, description, key, protocol=spec)


def hub_layout(path: Path) -> HubSource | None:
    """The hub source whose repository layout the folder ``path`` holds (a file of one of its splits), if any."""
    if path.is_dir():
        for spec in HUB_TABLE.values():
            if any((path / file).is_file() for file in spec.files.values()):
                return spec
    return None


def load_hub(spec: HubSource, split: str, source: str, cache_dir: str | None = None, root: Path | None = None,
             streaming: bool = False, flag: str = "--dataset") -> Documents:
    """The documents of ``split`` of ``spec``: from the Hub, or from ``root`` in the repository's layout."""
    file = spec.files[split]
    if root is not None:
        path = Path(root) / file
        if not path.is_file():
            raise UsageError(f"{flag} {source}: this local copy of {spec.name} ({spec.repo}) has no {file}, the file "
                             f"of its {split} split. Add it (the Hub's layout), or use another source.")
        rows = _load_local_file(path, split, cache_dir, streaming)
        identity = file_digest(path, digest_memo(cache_dir))
    else:
        rows = _load_from_hub(spec, split, cache_dir, streaming, flag)
        identity = getattr(rows, "_fingerprint", None) or "streamed"
    if rows.column_names is not None and spec.column not in rows.column_names:  # a stream may not know them
        raise UsageError(f"{flag} {source}: {file} has no '{spec.column}' column (columns: {', '.join(rows.column_names)}).")
    rows = rows.select_columns([spec.column])
    if spec.column != TEXT:
        rows = rows.rename_column(spec.column, TEXT)
    limit = spec.max_documents.get(split)
    if limit is not None:
        rows = rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))
    what = spec.note.get(split, split)
    description = f"{spec.name} {what}" + (f", first {limit:,} documents" if limit else "") + " (papers' protocol)"
    if root is not None:
        description += f", local copy in {root}"
    key = key_of("hub v1", spec.name, spec.repo, spec.revision, file, split, limit, identity)
    return Documents(source, split, rows, spec.joiner_for(split), description, key, protocol=spec)


def _load_local_file(path: Path, split: str, cache_dir: str | None, streaming: bool):
    import datasets

    builder = "parquet" if path.name.endswith(".parquet") else "json"
    return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir, streaming=streaming)


def _load_from_hub(spec: HubSource, split: str, cache_dir: str | None, streaming: bool, flag: str):
    import datasets

    reason = offline_reason()
    if reason is not None and streaming:  # a stream has no cache to fall back on
        raise offline_error("dataset", spec.name, flag, reason, local_copy=local_copy_hint(spec, split))
    try:
        with _offline_mode(reason is not None):
            return datasets.load_dataset(spec.repo, data_files={split: spec.files[split]}, split=split,
                                         revision=spec.revision, cache_dir=cache_dir, streaming=streaming)
    except Exception as err:  # offline and network failures surface as many types
        if reason is not None:
            raise offline_error("dataset", spec.name, flag, reason, local_copy=local_copy_hint(spec, split)) from err
        raise UsageError(
            f"{flag} {spec.name}: could not load {spec.files[split]} from the Hub dataset {spec.repo} "
            f"({type(err).__name__}: {err}). Use a local file or folder, builtin, or a local copy of the files in the "
            "Hub's layout."
        ) from err


def local_copy_hint(spec: HubSource, split: str = "test") -> str:
    """How to get ``spec``'s protocol from local files, for the offline message about ``split``."""
    if spec.name in LINE_PROTOCOLS:
        return (f"For the papers' {spec.name} protocol on a local copy of the text, give {spec.name}:FILE, e.g. "
                f"{spec.name}:data/{spec.name}.test.txt (each line stripped, joined with {spec.joiner!r}; the same file "
                "given as a plain path is scored as text, which gives other numbers).")
    return (f"For the papers' {spec.name} protocol on local files, give a folder holding {spec.repo}'s files in "
            f"its layout (e.g. DIR/{spec.files[split]}).")


@contextlib.contextmanager
def _offline_mode(offline: bool):
    """datasets' and huggingface_hub's offline switches on for this call only, restored after.

    They are module flags read at call time; set from ``HF_HUB_OFFLINE`` at import, so this
    only matters when the probe, not the user, found the Hub unreachable.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
