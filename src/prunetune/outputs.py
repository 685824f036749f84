"""Output folders: never destroy a user's files, never mix two runs, appear whole or not at all.

Every command that writes a folder follows one rule (:func:`check_output_dir`, then
:func:`output_lock`, then :func:`atomic_dir`):

* a missing or empty folder is written; an existing non-empty one is refused unless the user
  passes the overwrite flag (``--overwrite_output_dir``), and even then only a folder that
  prunetune wrote (it holds a ``prunetune.json`` or ``stage.json`` manifest) is replaced;
* a symbolic link, the current directory or one of its parents is never an output;
* the folder is locked for the life of the run (a sibling ``.NAME.lock``, released by the OS
  when the process dies), so a second run into it is refused and names the first;
* the folder is written into a temporary sibling (``.NAME.tmp-XXXX``) and renamed into place
  at the end; the manifest is the last file written and says ``"complete": true``. Temporary
  siblings left by a killed run are removed by the next run into the same place;
* files and folders get the permissions the user's umask gives (not 0700/0600), also in folders
  a run writes in place (recover): the lock normalises them when the run ends;
* a full disk (or quota, or any other failed write of the output) is a :class:`UsageError`
  naming the folder and the cause, and the temporary sibling is removed (:func:`writing_output`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from prunetune.errors import UsageError
from prunetune.write_errors import writing_output

logger = logging.getLogger(__name__)

MANIFEST_NAME = "prunetune.json"
STAGE_MANIFEST_NAME = "stage.json"  # a pipeline stage folder
# a folder holding one of these was written by prunetune and may be replaced on request
MANIFEST_NAMES = (MANIFEST_NAME, STAGE_MANIFEST_NAME)
OVERWRITE_FLAG = "--overwrite_output_dir"
TEMP_MARKERS = (".tmp-", ".old-")


# --------------------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set and restore)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool) -> None:
    """``mkdtemp``/``mkstemp`` create 0700/0600 on purpose; outputs should be shareable like any file."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def follow_umask_tree(path: Path) -> None:
    """Give ``path`` and everything below it the umask's permissions (links are left alone); safetensors writes 0600."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    for written in [path, *path.rglob("*")]:
        if not written.is_symlink():
            _follow_umask(written, directory=written.is_dir())


# --------------------------------------------------------------------------- checks


def is_prunetune_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in MANIFEST_NAMES)


def _is_cwd_or_parent(path: Path) -> bool:
    cwd = Path.cwd().resolve()
    return path == cwd or path in cwd.parents


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = OVERWRITE_FLAG, what: str = "Output folder") -> Path:
    """Validate an output folder before any work; returns the absolute path. Changes nothing.

    Raises:
        UsageError: a symlink, the current directory or a parent of it, a file, a non-empty
            folder without ``overwrite``, or (with it) a non-empty folder prunetune did not write.
    """
    given = str(path)
    path = Path(path).expanduser()
    if path.is_symlink():
        raise UsageError(f"{what} {given} is a symbolic link (to {os.readlink(path)}); prunetune never writes through "
                         "or replaces a link. Give the real folder path.")
    path = path.absolute()
    resolved = path.resolve()
    if _is_cwd_or_parent(resolved):
        raise UsageError(f"{what} {given} is the current directory or one of its parents; give a new folder below it, "
                         "e.g. out/run1.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {given} exists and is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(f"{what} {given} already exists and is not empty. Choose another path, or pass {flag} to "
                             "replace it (only a folder written by prunetune is replaced).")
        if not is_prunetune_folder(path):
            raise UsageError(f"{what} {given} is not empty and was not written by prunetune (no {MANIFEST_NAME} in it): "
                             f"{flag} replaces only prunetune's own outputs. Choose another path or empty it yourself.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {given} cannot be created: {parent} is not writable. Choose a writable location.")
    return path


def check_output_file(path: str | Path, flag: str = "--json") -> Path:
    """Before any work: ``path`` can be written as a file (not a folder; the nearest existing folder above is writable)."""
    target = Path(path).expanduser()
    if not str(path).strip() or target.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give a file path such as {str(target / 'result.json')!r}.")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path!r} cannot be written: {str(existing)!r} is a file, not a folder. "
                         "Give a path inside a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r} cannot be written: the folder {str(existing)!r} is not writable. "
                         "Give a path in a folder you can write to.")
    return target


# --------------------------------------------------------------------------- lock


def _lock_paths(path: Path) -> tuple[Path, Path]:
    path = Path(path).expanduser().absolute()
    return path.with_name(f".{path.name}.lock"), path.with_name(f".{path.name}.lock.owner")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) a killed run left; call under the lock."""
    path = Path(path).expanduser().absolute()
    if not path.parent.is_dir():
        return []
    removed = []
    for marker in TEMP_MARKERS:
        for stale in path.parent.glob(f".{path.name}{marker}*"):
            if stale.is_dir() and not stale.is_symlink():
                logger.warning("removing %s, left by an interrupted run into %s", stale, path)
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


# The folders the current call chain holds locked: a command locks its output, then a helper that
# locks it too (save_model_dir) nests instead of deadlocking against it (flock locks belong to open
# file descriptions). Set by the lock's block and reset when it ends, so nothing outlives the block;
# another thread does not see it, so a second writer there is refused like another process.
_HELD_HERE: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar("prunetune_output_locks",
                                                                              default=frozenset())


@contextlib.contextmanager
def output_lock(path: str | Path, command: str = "prunetune"):
    """Hold an exclusive lock on an output folder for the block (released on exit and on crash).

    The lock is a sibling file, so it survives the folder being renamed into place. Under it,
    temporary folders left by an earlier killed run into the same place are removed.

    When the block ends, whatever the run wrote into the folder in place is given the umask's
    permissions, and a full disk inside the block is a :class:`UsageError` naming the folder.

    Raises:
        UsageError: another process or thread holds the lock (the message names it).
    """
    from filelock import FileLock, Timeout

    path = Path(path).expanduser().absolute()
    held = _HELD_HERE.get()
    if path in held:  # this call chain holds it already (a command locks, then a helper that locks too runs)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file, owner_file = _lock_paths(path)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = "another process"
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(owner_file.read_text(encoding="utf-8"))
            owner = f"process {info['pid']} ({info['command']}, started {info['started']})"
        raise UsageError(f"Output folder {path} is in use by {owner}. Wait for that run to finish, or choose another "
                         "folder: two runs never write into one folder.") from None
    try:
        _follow_umask(lock_file, directory=False)
        with contextlib.suppress(OSError):
            owner_file.write_text(json.dumps({"pid": os.getpid(), "command": command,
                                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}), encoding="utf-8")
        remove_stale_temporaries(path)
        token = _HELD_HERE.set(held | {path})
        try:
            with writing_output(path, storage_only=True):
                yield path
        finally:
            _HELD_HERE.reset(token)
            follow_umask_tree(path)  # writers that work in place (recover: safetensors makes 0600 files)
    finally:
        # unlinked while still held: a run that opens the old file now fails to lock it; one that
        # creates a new file only finds the finished folder (refused unless it may overwrite)
        for file in (owner_file, lock_file):
            with contextlib.suppress(OSError):
                file.unlink()
        lock.release()


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, flag: str = OVERWRITE_FLAG):
    """Yield a temporary sibling directory that becomes ``path`` when the block succeeds.

    An existing ``path`` is checked again at the end (something may have appeared since the
    first check) and replaced only under the rules of :func:`check_output_dir`.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing_output(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with writing_output(path, storage_only=True):  # the block may read too: only storage failures are ours
            yield tmp
        check_output_dir(path, overwrite=overwrite, flag=flag)
        follow_umask_tree(tmp)  # some writers (safetensors) create 0600 files
        with writing_output(path):
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _follow_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------- manifests


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for manifests."""
    import importlib.metadata as metadata
    import platform

    versions = {"python": platform.python_version()}
    for name in ("prunetune", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_model_dir(model, tokenizer, path: str | Path, manifest: dict, overwrite: bool = False,
                   extra_files: dict[str, dict] | None = None) -> Path:
    """Save a Hugging Face model folder (safetensors + tokenizer) plus ``prunetune.json``, atomically.

    Args:
        extra_files: JSON files to write into the folder too (name -> payload), before the manifest.
    """
    path = check_output_dir(path, overwrite=overwrite)
    with output_lock(path), atomic_dir(path, overwrite=overwrite) as tmp, writing_output(path):  # only writes here
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, payload in (extra_files or {}).items():
            write_json(tmp / name, payload)
        write_json(tmp / MANIFEST_NAME, {**manifest, "complete": True, "versions": library_versions()})  # last
    return path


def read_manifest(path: str | Path) -> dict | None:
    """The ``prunetune.json`` manifest of a folder, or None when it has none.

    Raises:
        UsageError: the manifest is not valid JSON (a damaged folder).
    """
    file = Path(path).expanduser() / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{file} is damaged ({err}); the folder was not written whole. Run the command that made it again.") from err
    if not isinstance(manifest, dict):
        raise UsageError(f"{file} is damaged (not a JSON object); run the command that made it again.")
    return manifest


def require_complete(path: str | Path, what: str = "folder") -> dict | None:
    """The folder's manifest; refuse a folder whose prunetune run has not finished.

    Manifests written before the ``complete`` flag existed were only ever written at the end
    of a run, so a manifest without the flag counts as complete.
    """
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("complete") is False:
        stage = manifest.get("recovery_method") or manifest.get("stage") or "prunetune"
        raise UsageError(
            f"The {what} {path} belongs to a {stage} run that has not finished (it was interrupted, or is still "
            f"running): its {MANIFEST_NAME} says complete: false. Resume it (prunetune recover ... "
            f"--resume_from_checkpoint latest --output_dir {path}), or use one of its checkpoint-N folders."
        )
    return manifest


def check_apart(output: str | Path, inputs: dict[str, str | Path | None], flag: str = "--output_dir") -> None:
    """Refuse an output folder that is, contains or lies inside one of the command's local inputs.

    Replacing or writing such a folder would destroy or alter an input before (or while) it is read:
    ``--overwrite_output_dir`` with the pruned model's own folder deletes the model it is about to
    load. Inputs that are not local paths (hub ids, named sources) are skipped. Changes nothing.

    Args:
        output: the output folder as given.
        inputs: flag -> the value given for it (None or a non-path: skipped).

    Raises:
        UsageError: naming the flag, both paths and how they overlap.
    """
    target = Path(output).expanduser().absolute().resolve()
    for name, value in inputs.items():
        if value is None or str(value).strip() == "":
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue
        source = source.absolute().resolve()
        if source == target:
            how = "is"
        elif target in source.parents:
            how = "contains"
        elif source in target.parents:
            how = "lies inside"
        else:
            continue
        raise UsageError(f"{flag} {output} {how} the input {name} {value}: writing there could replace or delete that "
                         f"input before it is read. Give {flag} a folder apart from every input.")
