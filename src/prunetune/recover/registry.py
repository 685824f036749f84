"""The recovery methods by name: ``--recovery_method`` -> its setup function.

A method is one module beside its siblings exposing ``setup(model, args, resume_dir) -> Setup``
(:mod:`prunetune.recover.base`); adding one means one module and one entry here -- the recipe
(:mod:`prunetune.recipe`) and the CLI take their list of methods from this table.
"""

from __future__ import annotations

from prunetune.recover.full import setup_full
from prunetune.recover.lora import setup_lora, setup_masked_lora

SETUPS = {"lora": setup_lora, "masked_lora": setup_masked_lora, "full": setup_full}
# blockwise trains block after block against the dense model, without the Trainer (prunetune.recipe.blockwise)
METHODS = (*SETUPS, "blockwise")
