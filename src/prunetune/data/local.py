"""Local data: text, JSON Lines, JSON and Parquet files, or a folder of them, read by `datasets`.

Each file goes through ``datasets.load_dataset(<builder>, data_files=...)`` (``text`` for
.txt/.md, ``json`` for .jsonl/.json, ``parquet``), optionally gzipped (``.jsonl.gz``), so a
large file is converted once into memory-mapped Arrow in the datasets cache instead of being
read into Python lists. ``path:field`` names the text field of JSON/Parquet (default ``text``).

Documents: a JSON/Parquet record is one document; a text file is one document (its lines
joined back with their line breaks), as before ``datasets``: reading a .txt line by line as
``run_clm.py`` does would put the tokenizer's BOS (and prunetune's EOS) around every line.

Splits:

* a folder with ``train.*`` / ``validation.*`` (``valid``, ``val``) / ``test.*`` files: each
  split is its files;
* anything else (one file, or a folder of files not named by split): the ``validation`` and
  ``test`` splits are a *held-out* part, the first ``validation_percent`` % of lines (text
  files, as ``run_clm.py``'s text loader counts rows) or records (JSON/Parquet) -- at least
  one -- and ``train`` is the rest, so nothing is evaluated on the text it trained on.
  ``validation_percent=0`` turns the hold-out off: every split is the whole source.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from prunetune.data.documents import TEXT, Documents, key_of
from prunetune.data.tokens import cache_folder
from prunetune.digest import FolderMemo, file_digest
from prunetune.errors import UsageError

KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSED = (".gz",)  # text and JSON files may be gzipped, as the hub's C4 shards are
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
UNITS = {"text": "line", "json": "record", "parquet": "record"}  # what the held-out percentage counts


def file_kind(path: Path) -> str | None:
    """``text``, ``json`` or ``parquet`` from the file name (``.jsonl.gz`` is json); None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
        return KINDS.get(suffixes[-1]) if suffixes and suffixes[-1] != ".parquet" else None
    return KINDS.get(suffixes[-1]) if suffixes else None


def _split_path_field(source: str) -> tuple[Path, str]:
    """``data.jsonl:body`` -> (Path('data.jsonl'), 'body'); plain paths get field 'text'."""
    path, field = source, "text"
    head, sep, tail = source.rpartition(":")
    if sep and head and not Path(source).exists() and Path(head).exists() and "/" not in tail:
        path, field = head, tail
    return Path(path).expanduser(), field


def held_out_count(total: int, percent: float) -> int:
    """Rows in the held-out part: ``run_clm.py``'s ``train[:p%]`` (closest rounding), at least one,
    and, when there are two rows or more, at least one left for training."""
    count = max(1, round(percent * total / 100.0))
    return min(count, total - 1) if total >= 2 else count


def _source_files(path: Path, split: str) -> tuple[list[Path], bool]:
    """The files of ``split`` and whether they were chosen by their split name."""
    if not path.is_dir():
        return [path], False
    files = sorted(p for p in path.iterdir() if p.is_file() and file_kind(p))
    if not files:
        raise UsageError(f"The folder {path} holds no data files. Accepted file types: {describe_kinds()}.")
    stem = lambda p: p.name.lower().split(".")[0]
    if not any(stem(p) in sum(SPLIT_STEMS.values(), ()) for p in files):
        return files, False
    named = [p for p in files if stem(p) in SPLIT_STEMS[split]]
    if not named:
        raise UsageError(f"The folder {path} has split files but none for the '{split}' split. "
                         f"Add a file named {SPLIT_STEMS[split][0]}.txt (or .jsonl/.json/.parquet).")
    return named, True


def describe_kinds() -> str:
    return "/".join(KINDS) + " (text and JSON also gzipped, e.g. .jsonl.gz)"


def digest_memo(cache_dir: str | None) -> FolderMemo:
    """Where local files' digests are remembered (see :func:`prunetune.digest.file_digest`): hashing a
    C4 shard costs a second, and the second call of ``training_blocks`` should cost less than ten in all."""
    return FolderMemo(cache_folder(cache_dir) / "file-digests")


def load_local(source: str, split: str, cache_dir: str | None, validation_percent: float,
               streaming: bool = False) -> Documents:
    """The documents of ``split`` of a local file or folder (see the module docstring)."""
    path, field = _split_path_field(source)
    files, named = _source_files(path, split)
    kinds = [file_kind(p) for p in files]
    hold_out = not named and validation_percent > 0
    if streaming and (hold_out or "text" in kinds):
        raise UsageError(
            f"Cannot stream {source}: streaming reads JSON/Parquet records of files named by split (or with "
            "validation_percent=0), because a held-out percentage needs the length up front and a text file is "
            "one document. Load it without streaming (it is converted once to memory-mapped Arrow)."
        )
    tables = [_read_rows(p, kind, field, cache_dir, streaming) for p, kind in zip(files, kinds)]
    unit = UNITS[kinds[0]] if len({UNITS[k] for k in kinds}) == 1 else "row"  # mixed: lines of text, records of data files
    digests = [(p.name, kind, file_digest(p, digest_memo(cache_dir))) for p, kind in zip(files, kinds)]
    if streaming:
        rows = _concatenate(tables)
        key = key_of("local v1", digests, field, "streamed whole")
        description = (_describe_whole(source, split, files, named, 0, unit) if named
                       else f"{source}, whole (no held-out part: validation_percent=0)") + ", streamed"
        return Documents(source, split, rows, "\n\n", description, key)
    counts = [len(t) for t in tables]
    total = sum(counts)
    if total == 0 or all(kind == "text" and not "".join(t[TEXT]).strip() for t, kind in zip(tables, kinds)):
        raise UsageError(f"The data source {source} is empty: it holds no text to read.")
    first, stop, description = 0, total, _describe_whole(source, split, files, named, total, unit)
    if hold_out:
        held = held_out_count(total, validation_percent)
        if split == "train":
            first = held
            description = (f"{source}, {unit}s {held + 1:,}-{total:,} ({total - held:,} of {total:,}; "
                           f"the first {validation_percent:g}% are held out)")
        else:
            stop = held
            description = f"{source}, held-out first {validation_percent:g}% of {unit}s ({held:,} of {total:,})"
        if first >= stop:
            raise UsageError(
                f"{source} has {_count(total, unit)}: holding out the first {validation_percent:g}% (at least "
                f"one) leaves nothing for the {split} split. Give more {unit}s, a folder with "
                "train/validation files, or validation_percent=0 (--validation_split_percentage 0) to use the "
                "whole source for every split."
            )
    rows = _documents_between(tables, kinds, counts, first, stop)
    key = key_of("local v1", digests, field, first, stop, total)
    return Documents(source, split, rows, "\n\n", description, key)


def _describe_whole(source, split, files, named, total, unit) -> str:
    if named:
        return f"{source} {split} file{'s' if len(files) > 1 else ''} ({', '.join(p.name for p in files)})"
    return f"{source}, whole ({_count(total, unit)}; no held-out part: validation_percent=0)"


def _count(number: int, unit: str) -> str:
    return f"{number:,} {unit}{'' if number == 1 else 's'}"


def _documents_between(tables, kinds, counts, first: int, stop: int):
    """Rows ``first..stop`` of the files in order: records as they are, each text file's lines as one document."""
    import datasets

    parts, offset = [], 0
    for table, kind, count in zip(tables, kinds, counts):
        a, b = max(first - offset, 0), min(stop - offset, count)
        offset += count
        if a >= b:
            continue
        if kind == "text":
            parts.append(datasets.Dataset.from_dict({TEXT: ["".join(table[a:b][TEXT])]}))
        else:
            parts.append(table.select(range(a, b)) if (a, b) != (0, count) else table)
    return _concatenate(parts)


def _concatenate(parts):
    import datasets

    if len(parts) == 1:
        return parts[0]
    if hasattr(parts[0], "__len__"):
        parts = [p.cast_column(TEXT, datasets.Value("string")) if p.features[TEXT] != datasets.Value("string") else p
                 for p in parts]
    return datasets.concatenate_datasets(parts)


def _read_rows(path: Path, kind: str, field: str, cache_dir: str | None, streaming: bool):
    """One file through ``datasets.load_dataset``: a table with one ``text`` column (lines or records)."""
    import datasets

    options = {"keep_linebreaks": True} if kind == "text" else {}
    try:
        rows = datasets.load_dataset(kind, data_files={"rows": str(path)}, split="rows", cache_dir=cache_dir,
                                     streaming=streaming, **options)
    except Exception as err:  # datasets wraps every parse error in DatasetGenerationError
        raise _read_error(path, kind, field, err) from err
    if kind == "text":
        return rows
    if streaming:
        return rows.select_columns([field]).rename_column(field, TEXT) if field != TEXT else rows.select_columns([TEXT])
    return _text_column(rows, path, kind, field)


def _text_column(rows, path: Path, kind: str, field: str):
    import pyarrow.compute as pc

    if field not in rows.column_names or getattr(rows.features[field], "dtype", None) not in ("string", "large_string"):
        if kind == "json":
            raise UsageError(json_problem(path, field) or _no_field(path, field, "Its records"))
        if field not in rows.column_names:
            raise UsageError(f"{path} has no column '{field}' (columns: {', '.join(rows.column_names)}). "
                             f"Name the text column with '{path}:COLUMN'.")
        raise UsageError(f"The column '{field}' of {path} holds {rows.features[field]} values, not text. "
                         f"Name the text column with '{path}:COLUMN'.")
    rows = rows.select_columns([field])
    column = rows.data.column(field)
    if column.null_count:
        if kind == "json":  # a record without the field
            raise UsageError(json_problem(path, field) or _no_field(path, field, "Some records"))
        rows = rows.select(pc.indices_nonzero(pc.is_valid(column)).to_numpy())  # Parquet: empty cells are skipped
    return rows.rename_column(field, TEXT) if field != TEXT else rows


def _no_field(path: Path, field: str, who: str) -> str:
    return (f"{who} of {path} have no '{field}' field. Each JSON record must be an object with a '{field}' string; "
            f"name another field with '{path}:FIELD'.")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def json_problem(path: Path, field: str) -> str | None:
    """The first line (JSON Lines) or record (a JSON array) without a ``field`` string, said for people.

    Counts lines, not records: blank lines are skipped by the reader but not by the person
    who opens the file at the line the message names.
    """
    try:
        with _open_text(path) as handle:
            head = handle.read(4096).lstrip()
        if head.startswith("["):
            with _open_text(path) as handle:
                records = json.load(handle)
            located = ((f"Record {number}", record) for number, record in enumerate(records, 1))
        else:
            located = _json_lines(path)
        for where, record in located:
            if isinstance(record, str):  # a line that does not parse
                return f"{where} of {path} is not valid JSON ({record}). Give one JSON object per line."
            if isinstance(record, dict) and field in record and not isinstance(record[field], str):
                return (f"{where} of {path}: its '{field}' field holds {type(record[field]).__name__} "
                        f"{json.dumps(record[field])[:40]}, not a string. Each record's '{field}' must be text.")
            if not isinstance(record, dict) or field not in record:
                return (f"{where} of {path} has no '{field}' field. Each JSON record must be an object with a "
                        f"'{field}' string; name another field with '{path}:FIELD'.")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"Cannot read the JSON file {path}: {err}. Give a readable UTF-8 file."
    return None


def _json_lines(path: Path):
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"Line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"Line {number}", err.msg


def _read_error(path: Path, kind: str, field: str, err: Exception) -> UsageError:
    if kind == "json":
        problem = json_problem(path, field)
        if problem:
            return UsageError(problem)
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    what = {"text": "text file", "json": "JSON file", "parquet": "Parquet file"}[kind]
    return UsageError(f"Cannot read the {what} {path}: {cause}. Give a readable UTF-8 {what}.")
