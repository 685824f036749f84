"""Model and tokenizer loading: a hub id, a local folder, or ``tiny`` (the bundled model).

Safetensors only, ``trust_remote_code`` off unless asked. Failures a user can cause (a
missing folder, a hub id while offline, an unknown dtype) become :class:`UsageError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from prunetune.errors import UsageError

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_PATH = Path(__file__).resolve().parent / "tiny"

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


def resolve_model_path(name_or_path: str) -> str:
    """``tiny`` -> the bundled model's folder; local paths must exist; hub ids pass through."""
    if name_or_path == TINY_NAME:
        return str(TINY_PATH)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"Model path {name_or_path!r} is a file; give the folder that holds config.json and the weights.")
        if not (path / "config.json").exists():
            raise UsageError(f"Model folder {name_or_path!r} has no config.json; give a Hugging Face model folder (config.json + safetensors weights), a hub id, or 'tiny'.")
        return str(path)
    # A hub id is "name" or "org/name"; anything else that does not exist is a bad path.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local:
        raise UsageError(f"Model path {name_or_path!r} does not exist. Give an existing model folder, a hub id such as meta-llama/Llama-2-7b-hf, or 'tiny' for the bundled model.")
    return name_or_path


def torch_dtype(name: str):
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"Unknown dtype {name!r}; accepted: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_tokenizer(name_or_path: str, options: LoadOptions | None = None):
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=options.cache_dir, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(_load_failure("tokenizer", name_or_path, err)) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, options: LoadOptions | None = None):
    """A causal LM in eval mode, from safetensors weights."""
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    path = resolve_model_path(name_or_path)
    kwargs = dict(
        dtype=torch_dtype(options.dtype),
        cache_dir=options.cache_dir,
        trust_remote_code=options.trust_remote_code,
        use_safetensors=True,
    )
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(_load_failure("model", name_or_path, err)) from err
    if options.device_map is None and options.device:
        model.to(options.device)
    model.eval()
    return model


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


def _load_failure(what: str, name: str, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"Could not load the {what} {name!r}: {first_line}. Give a local Hugging Face model folder "
        "(config.json + safetensors weights + tokenizer files), 'tiny' for the bundled model, or a "
        "hub id reachable from this machine (the Hub needs network access or a filled HF_HOME cache)."
    )
