"""Is the Hugging Face Hub reachable? Answered in seconds, and remembered for a minute.

Without network, ``from_pretrained`` / ``load_dataset`` retry for 25-55 s and print a dozen
warnings before failing. Before prunetune hands a hub id to them it asks :func:`hub_offline`:

* ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) set by the user: offline, no probe;
* otherwise one TCP connection to the Hub's host (``HF_ENDPOINT`` or huggingface.co, port
  443, 3 s timeout) decides. The answer is remembered for :data:`REMEMBER_S` seconds: one
  command asks several times (tokenizer, model, data) and should pay the wait once, but a
  long-lived process (a notebook, a pipeline) must see the network come back.

Offline, callers load with ``local_files_only`` (the cache still serves what it holds) and,
when the cache does not hold it, raise :func:`offline_error`, which names the flag the user gave.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from prunetune.errors import UsageError

PROBE_TIMEOUT_S = 3.0
REMEMBER_S = 60.0  # how long one probe's answer stands (both answers: a reachable Hub can go away too)
TRUE = {"1", "true", "yes", "on"}


def _env_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# endpoint -> (time.monotonic() of the probe, its answer); entries older than REMEMBER_S are asked again.
_answers: dict[str, tuple[float, str | None]] = {}


def _probe(endpoint: str) -> str | None:
    """None when the endpoint accepts a TCP connection, else why not (one line); remembered REMEMBER_S seconds."""
    now = time.monotonic()
    asked = _answers.get(endpoint)
    if asked is not None and 0 <= now - asked[0] < REMEMBER_S:
        return asked[1]
    answer = _connect(endpoint)
    _answers[endpoint] = (now, answer)
    return answer


def _connect(endpoint: str) -> str | None:
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err.strerror or err})"


def offline_reason() -> str | None:
    """Why the Hub cannot be used from this process (None: it can)."""
    if _env_offline():
        return "HF_HUB_OFFLINE is set"
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def hub_offline() -> bool:
    return offline_reason() is not None


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path, never a hub id (``org/name``).

    It starts with ``.``, ``/`` or ``~``; has more than one ``/``; uses ``\\``; or its first
    component exists here (``out/nonexistent`` when ``out/`` exists: a mistyped folder).
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(head)


def path_shaped(name: str) -> bool:
    """Has a path separator or starts with ``.``, ``/`` or ``~``: what a user may have meant as a local
    path, although ``org/name`` is also the shape of a hub id (see :func:`looks_like_path` for the sure cases)."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def valid_repo_id(name: str) -> bool:
    """Whether ``name`` is a well-formed hub repository id (``name`` or ``org/name``, no spaces, ``--`` or ``..``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def offline_error(what: str, name: str, flag: str, reason: str | None = None, local_copy: str = "") -> UsageError:
    """The one message for a hub name that cannot be had offline.

    Args:
        local_copy: a sentence on reading the same data from local files, appended.
    """
    reason = reason or offline_reason() or "the Hub is unreachable"
    local = "a .txt/.jsonl/.json/.parquet file or folder, or builtin" if what == "dataset" else "a local model folder, or tiny"
    return UsageError(
        f"{flag} {name}: this {what} comes from the Hugging Face Hub, which cannot be used here ({reason}), and it is "
        f"not in the local cache. Give {local} instead, fill the cache on a machine with network (HF_HOME), or, with a "
        "filled cache, set HF_HUB_OFFLINE=1 to skip the network check." + (f" {local_copy}" if local_copy else "")
    )


def hub_failure(what: str, name: str, path: str, flag: str, err: Exception) -> UsageError:
    """The message for a model, tokenizer or config that ``from_pretrained`` could not load from ``path``
    (a hub id, or a local folder): offline, otherwise the library's reason; a name that may be a
    mistyped local path says that no such folder exists."""
    if not Path(path).is_dir() and offline_reason() is not None:
        failure = str(offline_error(what, name, flag)).removeprefix(f"{flag} {name}: ")
    else:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        failure = (f"Could not load the {what} {name!r}: {first_line}. Give a local Hugging Face model folder "
                   "(config.json + safetensors weights + tokenizer files), 'tiny' for the bundled model, or a hub id "
                   "reachable from this machine (the Hub needs network access or a filled HF_HOME cache).")
    if path_shaped(name) and not Path(name).expanduser().exists():  # a mistyped folder reads as an org/name hub id
        return UsageError(f"{flag} {name}: there is no local folder {name!r} (no such file or folder here), so it was "
                          "taken for a Hugging Face Hub id, and that failed too. Check the path (an absolute path or ./ "
                          f"removes the doubt). As a Hub id: {failure}")
    return UsageError(failure if failure.startswith("Could not") else f"{flag} {name}: {failure}")
