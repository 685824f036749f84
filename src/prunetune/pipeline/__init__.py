"""The pipeline: prune -> recover -> evaluate -> merge/export -> report, from one config.

This is the only package that knows the order of the stages. Each stage writes its own
directory under ``output_dir/stages/`` (or ``stages_dir``) with a ``stage.json`` manifest
holding the hash of its inputs: its own settings, the hashes of the stages it reads, and the
*content* fingerprints of every local file it reads (model folder, calibration, evaluation and
training data). A stage whose manifest is complete and whose hash is unchanged is reused, so a
re-run after a crash, or after adding a method to the config, redoes only what is missing,
while an edited data file or model folder redoes what read it. Stage directories are written
atomically; in a ``stages_dir`` shared by several configs a finished stage of another config is never
replaced (the new one goes beside it, its folder named with its hash). Everything the config alone can reveal -- numbers out of range, N:M groups that do
not tile a layer, windows longer than the model's context -- is checked before any stage runs.

Modules: ``config`` (the file's schema and checks), ``fingerprints`` (content identities),
``stages`` (the stage cache and its progress events), ``recovery`` (one recovery stage),
``layer_error`` (the per-layer error stage), ``results`` (stage results -> report data),
``run`` (:class:`Pipeline`, the order of the stages).

Usage::

    from prunetune.pipeline import load_config, run_pipeline
    result = run_pipeline(load_config("src/prunetune/configs/demo.yaml"), listener=lambda e: print(e.line()))
"""

from prunetune.pipeline.config import (
    CalibrationSpec,
    EvaluationSpec,
    PipelineConfig,
    PruneSpec,
    RecoverySpec,
    load_config,
)
from prunetune.pipeline.fingerprints import FingerprintCache, data_identity, model_identity
from prunetune.pipeline.recovery import recovery_dtype
from prunetune.pipeline.run import FINGERPRINT_CACHE, RESOLVED_CONFIG, Pipeline, PipelineResult, run_pipeline
from prunetune.pipeline.stages import STAGE_FORMAT, STAGE_MANIFEST, StageEvent, StageResult, StageRunner

__all__ = [
    "FINGERPRINT_CACHE",
    "RESOLVED_CONFIG",
    "STAGE_FORMAT",
    "STAGE_MANIFEST",
    "CalibrationSpec",
    "EvaluationSpec",
    "FingerprintCache",
    "Pipeline",
    "PipelineConfig",
    "PipelineResult",
    "PruneSpec",
    "RecoverySpec",
    "StageEvent",
    "StageResult",
    "StageRunner",
    "data_identity",
    "load_config",
    "model_identity",
    "recovery_dtype",
    "run_pipeline",
]
