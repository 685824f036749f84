"""Pruning methods and the :func:`prune` entry point.

A pruner is one file here and one entry in :data:`PRUNERS` (the registry, kept in
:mod:`prunetune.pruning.api` so that no module imports this package back); nothing in the
calibration driver, the CLI or the rest of the pipeline changes. Each pruner subclasses
:class:`~prunetune.pruning.base.Pruner` and says which statistic it accumulates and how
it chooses masks; selection maths lives in :mod:`prunetune.pruning.selection`; layer-wise
sparsity profiles (uniform, OWL, user files) in :mod:`prunetune.pruning.profile`.
"""

from __future__ import annotations

from prunetune.pruning.api import PRUNERS, PruneConfig, PruneReport, build_pruner, prune, pruner_class
from prunetune.pruning.base import Pruner

__all__ = ["PRUNERS", "PruneConfig", "PruneReport", "Pruner", "build_pruner", "prune", "pruner_class"]
