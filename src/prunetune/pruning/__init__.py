"""Pruning methods and the :func:`prune` entry point.

A pruner is one file here and one entry in :data:`PRUNERS`; nothing in the calibration
driver, the CLI or the rest of the pipeline changes. Each pruner subclasses
:class:`~prunetune.pruning.base.Pruner` and says which statistic it accumulates and how
it chooses masks; selection maths lives in :mod:`prunetune.pruning.selection`.
"""

from __future__ import annotations

from prunetune.errors import UsageError
from prunetune.pruning.base import Pruner
from prunetune.pruning.magnitude import MagnitudePruner
from prunetune.pruning.sparsegpt import SparseGPTPruner
from prunetune.pruning.wanda import WandaPruner

PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}


def pruner_class(name: str) -> type[Pruner]:
    """The registered pruner called ``name``.

    Raises:
        UsageError: unknown name (the message lists the accepted ones).
    """
    if name not in PRUNERS:
        raise UsageError(f"Unknown pruning method {name!r}; accepted: {', '.join(PRUNERS)}.")
    return PRUNERS[name]


from prunetune.pruning.api import PruneConfig, PruneReport, build_pruner, prune  # noqa: E402

__all__ = ["PRUNERS", "PruneConfig", "PruneReport", "Pruner", "build_pruner", "prune", "pruner_class"]
