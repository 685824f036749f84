"""The recovery recipe: the Trainer program over the :mod:`prunetune.recover` library.

``prunetune recover`` parses :mod:`.args` and calls :func:`recover`
(``prunetune.recipe.recover(model_args, data_args, recovery_args, training_args)``), which reads as
a table of contents (:mod:`.driver`): check -> build (:mod:`.build`, :mod:`.data_plan`) -> setup
(the method from :data:`prunetune.recover.registry.SETUPS`, :mod:`.trainer`) -> train -> save
(:mod:`.run_folder`, :mod:`.result`). :mod:`.memory_estimate` predicts the peak GPU memory of
``--recovery_method full`` from the model's shape (``--memory_estimate``). The library never
imports this package (torchtune's recipes-vs-library split).

:func:`recover` and :class:`RecoveryResult` load on first use, so reading the arguments
(``prunetune recover --help``) does not import the Trainer.
"""

from __future__ import annotations

import importlib

__all__ = ["recover", "RecoveryResult", "RESULTS_NAME"]

_HOMES = {"recover": "driver", "RecoveryResult": "result", "RESULTS_NAME": "result"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
