"""Load a recovery adapter (LoRA or masked LoRA) onto its pruned base model.

``apply_adapter(model, path)`` is what ``prunetune eval --lora_weights`` and ``prunetune merge``
call. It is ``PeftModel.from_pretrained`` plus the one thing PEFT cannot know: a masked LoRA
adapter needs :class:`~prunetune.recover.masked_lora.MaskedLoraConfig` to rebuild its masked
layers (plain PEFT would load it as unmasked LoRA). Adapters written by ``prunetune recover``
also record the zero count of every adapted layer of the base they were trained on; a base
with a different sparsity (the dense model, another pruning) is refused, since the adapter
was trained to correct *that* pruning -- and for masked LoRA the mask itself comes from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from prunetune.errors import UsageError
from prunetune.recover.masked_lora import MaskedLoraConfig, is_masked_config

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_config(adapter_path: str | Path) -> dict:
    """The saved ``adapter_config.json`` of a LoRA adapter folder.

    Raises:
        UsageError: not a folder, no adapter config (a full model folder gets its own hint), not LoRA.
    """
    path = Path(adapter_path).expanduser()
    if not path.is_dir():
        raise UsageError(f"Adapter folder {adapter_path} does not exist; give the --output_dir of `prunetune recover`.")
    file = path / ADAPTER_CONFIG
    if not file.exists():
        if (path / "config.json").exists():
            raise UsageError(f"{adapter_path} is a full model folder, not an adapter (recovery_method full saves the model "
                             f"itself): use it as --model {adapter_path} instead.")
        raise UsageError(f"{adapter_path} has no {ADAPTER_CONFIG}; it is not a PEFT adapter folder.")
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise UsageError(f"{adapter_path} holds a {config.get('peft_type')} adapter; prunetune applies LoRA adapters only.")
    return config


def check_base(model: nn.Module, adapter_path: str | Path) -> None:
    """Refuse a base whose adapted layers' zero counts differ from those the adapter was trained on."""
    from prunetune.outputs import read_manifest

    manifest = read_manifest(adapter_path) or {}
    expected = manifest.get("base_zero_counts")
    if not expected:
        return  # an adapter from elsewhere: nothing recorded to check against
    modules = dict(model.named_modules())
    for name, zeros in expected.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise UsageError(f"Adapter {adapter_path} was trained on a model with a layer {name}, which this base model lacks; "
                             f"apply it to {manifest.get('base_model', 'the pruned model it was trained on')}.")
        found = int((module.weight == 0).sum())
        if found != zeros:
            total = module.weight.numel()
            raise UsageError(
                f"Adapter {adapter_path} does not match this base model: {name} has {found / total:.2%} zeros here but "
                f"{zeros / total:.2%} in the model it was trained on. Apply it to "
                f"{manifest.get('base_model', 'the pruned model it was trained on')}."
            )


def apply_adapter(model: nn.Module, adapter_path: str | Path, is_trainable: bool = False) -> nn.Module:
    """Wrap ``model`` with the LoRA or masked LoRA adapter saved in ``adapter_path``.

    Args:
        model: the base model the adapter was trained on (the pruned model).
        adapter_path: a PEFT adapter folder (``prunetune recover`` output for lora / masked_lora).
        is_trainable: keep the adapter trainable (default: inference).

    Returns:
        A ``peft.PeftModel``.

    Raises:
        UsageError: not an adapter folder, or an adapter that does not match the base model.
    """
    from peft import LoraConfig, PeftModel

    saved = read_adapter_config(adapter_path)
    check_base(model, adapter_path)
    masked = is_masked_config(saved)
    config = MaskedLoraConfig.load(adapter_path) if masked else LoraConfig.from_pretrained(str(adapter_path))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_path), config=config, is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"Adapter {adapter_path} does not match this base model: {first[:400]}") from err
    logger.info("applied %s adapter %s", "masked LoRA" if masked else "LoRA", adapter_path)
    if not is_trainable:
        peft_model.eval()
    return peft_model
