"""Load a recovery adapter (LoRA or masked LoRA) onto its pruned base model.

``apply_adapter(model, path)`` is what ``prunetune eval --lora_weights`` and ``prunetune merge``
call. It is ``PeftModel.from_pretrained`` plus what PEFT cannot know:

* a masked LoRA adapter needs :class:`~prunetune.recover.masked_lora.MaskedLoraConfig` to
  rebuild its masked layers. Its ``adapter_config.json`` says ``"peft_type":
  "PRUNETUNE_MASKED_LORA: ..."``, which plain PEFT refuses (it would apply the adapter
  unmasked); adapters saved before that say ``"LORA"`` with ``"use_masked_lora": true`` and
  load here all the same;
* the base must be the pruning the adapter was trained on. Adapters written by
  ``prunetune recover`` record, for every adapted layer, a digest of the pruned positions
  (``base_mask_digests``, see :func:`prunetune.masks.mask_digest`) and the zero count
  (``base_zero_counts``) in their ``prunetune.json``. A base pruned differently -- the dense
  model, another method, or the same per-layer counts at other positions -- is refused,
  since the adapter was trained to correct *that* pruning, and for masked LoRA the mask
  itself comes from it. Adapters written before digests carry counts only; those are
  checked with a warning that positions cannot be.

A damaged folder (unreadable or invalid ``adapter_config.json``, missing or truncated
``adapter_model.safetensors``) is a :class:`~prunetune.errors.UsageError` naming the file.
"""

from __future__ import annotations

import json
import logging
from numbers import Real
from pathlib import Path

from torch import nn

from prunetune.errors import UsageError
from prunetune.masks import layer_digests
from prunetune.modules import weight_matrix
from prunetune.masks import zero_counts
from prunetune.outputs import MANIFEST_NAME, read_manifest, require_complete
from prunetune.recover.masked_lora import (
    MASKED_PEFT_TYPE,
    MaskedLoraConfig,
    is_masked_config,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"  # PEFT's older format, loaded by PEFT as is
EXPECTED = "the folder `prunetune recover` (or PEFT's save_pretrained) wrote"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:400] if text else type(err).__name__


def read_adapter_config(adapter_path: str | Path) -> dict:
    """The saved ``adapter_config.json`` of a LoRA adapter folder, checked.

    Raises:
        UsageError: not a folder, no adapter config (a full model folder gets its own hint),
            a config that is not a JSON object, neither LoRA nor masked LoRA, or a LoRA field of the wrong type.
    """
    path = Path(adapter_path).expanduser()
    if path.is_dir():
        require_complete(path, "adapter folder")  # a run still training (or killed): its adapter is not final
    if not path.is_dir():
        raise UsageError(f"Adapter folder {adapter_path} does not exist; give the --output_dir of `prunetune recover`.")
    file = path / ADAPTER_CONFIG
    if not file.exists():
        if (path / "config.json").exists():
            raise UsageError(f"{adapter_path} is a full model folder, not an adapter (recovery_method full saves the model "
                             f"itself): use it as --model {adapter_path} instead.")
        raise UsageError(f"{adapter_path} has no {ADAPTER_CONFIG}; it is not a PEFT adapter folder.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{file} is not valid JSON ({_first_line(err)}); expected the LoRA config in {EXPECTED}. "
                         "The file is damaged: copy the adapter folder again.") from err
    if not isinstance(config, dict):
        raise UsageError(f"{file} holds a JSON {type(config).__name__}, not an object; expected the LoRA config in {EXPECTED}.")
    if config.get("peft_type") != "LORA" and not is_masked_config(config):
        raise UsageError(f"{adapter_path} holds a {config.get('peft_type')} adapter; prunetune applies LoRA and "
                         f"{MASKED_PEFT_TYPE} (masked LoRA) adapters only.")
    _check_fields(config, file)
    return config


def _check_fields(config: dict, file: Path) -> None:
    """The fields whose wrong type PEFT reports only later, as a TypeError deep inside layer construction."""
    problems = []
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        problems.append(f"r is {rank!r} (expected a positive integer, the LoRA rank)")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        problems.append(f"lora_alpha is {alpha!r} (expected a number)")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout is {dropout!r} (expected a number in [0, 1))")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules is {targets!r} (expected a layer name, a list of names, or null)")
    if problems:
        raise UsageError(f"{file} is not a valid LoRA adapter config: {'; '.join(problems)}. "
                         f"Expected the adapter_config.json in {EXPECTED}.")


def check_weights(adapter_path: str | Path) -> None:
    """Refuse an adapter folder whose weights file is missing, truncated or not safetensors.

    Reads only the file's header (safetensors checks it against the file's length).

    Raises:
        UsageError: naming the file and what is expected.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_path).expanduser()
    file = path / ADAPTER_WEIGHTS
    if not file.exists():
        if (path / ADAPTER_WEIGHTS_PICKLE).exists():
            return
        raise UsageError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the adapter's weights are missing "
                         f"(an interrupted save or copy?). Expected {EXPECTED}, with both files.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{file} is corrupt or truncated ({_first_line(err)}); expected the LoRA weights in {EXPECTED}. "
                         "Copy the adapter folder again, or re-run `prunetune recover`.") from err
    if not names:
        raise UsageError(f"{file} holds no tensors; expected the LoRA weights (lora_A / lora_B) in {EXPECTED}.")


def check_base(model: nn.Module, adapter_path: str | Path) -> None:
    """Refuse a base pruned differently from the one the adapter in ``adapter_path`` was trained on.

    Reads the folder's ``prunetune.json``; see :func:`check_base_manifest`.
    """
    try:
        manifest = read_manifest(adapter_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{Path(adapter_path) / MANIFEST_NAME} is not valid JSON ({_first_line(err)}); it is the "
                         f"manifest `prunetune recover` writes last. Copy the adapter folder again.") from err
    check_base_manifest(model, manifest, str(adapter_path))


def check_base_manifest(model: nn.Module, manifest: dict | None, where: str) -> None:
    """Refuse a base whose adapted layers are pruned differently from the base an adapter was trained on.

    Compares the digest of every adapted layer's pruned positions with the manifest's
    ``base_mask_digests``. A manifest written before digests (``base_zero_counts`` only) is
    checked by zero counts, with a warning that positions cannot be; a manifest with
    neither (an adapter from elsewhere) checks nothing.

    Args:
        model: the base model, plain or already wrapped by PEFT.
        manifest: the adapter's ``prunetune.json`` as a dict (None: nothing to check).
        where: the folder the manifest belongs to, named in the message (``Adapter {where} ...``).

    Raises:
        UsageError: a recorded layer missing from the model, or pruned differently; names the
            first such layer and the base the adapter was trained on (the manifest's ``base_model``).
    """
    manifest = manifest if isinstance(manifest, dict) else {}
    digests = manifest.get("base_mask_digests") or {}
    counts = manifest.get("base_zero_counts") or {}
    if not isinstance(digests, dict) or not isinstance(counts, dict):
        raise UsageError(f"The prunetune.json of {where} is damaged: base_mask_digests / base_zero_counts must map layer "
                         "names to values. Copy the adapter folder again.")
    if not digests and not counts:
        return  # an adapter from elsewhere: nothing recorded to check against
    base = manifest.get("base_model") or "the pruned model it was trained on"
    layers = _recorded_layers(model, list(digests or counts), where, base)
    if digests:
        found = layer_digests(layers)
        differing = [name for name in digests if found[name] != digests[name]]
        if differing:
            raise UsageError(_mismatch(where, base, layers, counts, differing, len(digests)))
        return
    logger.warning("Adapter %s records the zero counts of its base but not where the zeros are (written before "
                   "prunetune recorded mask digests): a base with the same counts at other positions cannot be told "
                   "apart. Re-run `prunetune recover` to record them.", where)
    found = dict(zip(layers, zero_counts(layers)))
    differing = [name for name, zeros in counts.items() if found[name] != zeros]
    if differing:
        raise UsageError(_mismatch(where, base, layers, counts, differing, len(counts)))


def _recorded_layers(model: nn.Module, names: list[str], where: str, base: str) -> dict[str, nn.Module]:
    """The layers the manifest names, unwrapped from PEFT's LoRA layers when the model is a PeftModel."""
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(plain.named_modules())
    layers = {}
    for name in names:
        module = modules.get(name)
        if module is not None and hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        if module is None or not hasattr(module, "weight"):
            raise UsageError(f"Adapter {where} was trained on a model with a layer {name}, which this base model lacks; "
                             f"apply it to {base}.")
        layers[name] = module
    return layers


def _mismatch(where: str, base: str, layers: dict[str, nn.Module], counts: dict, differing: list[str], recorded: int) -> str:
    name = differing[0]
    weight = weight_matrix(layers[name])
    total = weight.numel()
    here = int((weight == 0).sum())
    there = counts.get(name)
    if there is None:
        detail = f"{here / total:.2%} zeros here"
    elif there == here:
        detail = f"{here / total:.2%} zeros here and there: the same count at other positions"
    else:
        detail = f"{here / total:.2%} zeros here, {there / total:.2%} in the model it was trained on"
    more = f"; {len(differing) - 1} more of its {recorded} recorded layers differ too" if len(differing) > 1 else ""
    return (f"Adapter {where} does not match this base model: {name} is pruned differently here than in the model it "
            f"was trained on ({detail}){more}. An adapter corrects the pruning it was trained on (a masked LoRA "
            f"adapter's mask is that pruning), so it cannot be applied to another: apply it to {base}, or recover "
            f"a new adapter on this model.")


def apply_adapter(model: nn.Module, adapter_path: str | Path, is_trainable: bool = False) -> nn.Module:
    """Wrap ``model`` with the LoRA or masked LoRA adapter saved in ``adapter_path``.

    Args:
        model: the base model the adapter was trained on (the pruned model).
        adapter_path: a PEFT adapter folder (``prunetune recover`` output for lora / masked_lora).
        is_trainable: keep the adapter trainable (default: inference).

    Returns:
        A ``peft.PeftModel``.

    Raises:
        UsageError: not an adapter folder, a damaged one, or an adapter that does not match the base model.
    """
    from peft import LoraConfig, PeftModel
    from safetensors import SafetensorError

    saved = read_adapter_config(adapter_path)
    check_weights(adapter_path)
    check_base(model, adapter_path)
    masked = is_masked_config(saved)
    config_file = Path(adapter_path) / ADAPTER_CONFIG
    try:
        config = MaskedLoraConfig.load(adapter_path) if masked else LoraConfig.from_pretrained(str(adapter_path))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{config_file} is not a valid LoRA adapter config: {_first_line(err)}. "
                         f"Expected the adapter_config.json in {EXPECTED}.") from err
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_path), config=config, is_trainable=is_trainable)
    except SafetensorError as err:
        raise UsageError(f"{Path(adapter_path) / ADAPTER_WEIGHTS} is corrupt ({_first_line(err)}); expected the LoRA "
                         f"weights in {EXPECTED}. Copy the adapter folder again.") from err
    except TypeError as err:  # a config value of the wrong type, met while building the layers
        raise UsageError(f"{config_file} is not a valid LoRA adapter config: {_first_line(err)}. "
                         f"Expected the adapter_config.json in {EXPECTED}.") from err
    except (ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"Adapter {adapter_path} does not match this base model: {_first_line(err)}") from err
    logger.info("applied %s adapter %s", "masked LoRA" if masked else "LoRA", adapter_path)
    if not is_trainable:
        peft_model.eval()
    return peft_model
