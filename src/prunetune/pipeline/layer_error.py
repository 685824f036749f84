"""The per-layer error stage: every configuration's weights against the dense weights, layer by layer.

Each configuration in the report -- a pruned model, and each recovered model as it was
evaluated (lora: W + BA merged, and re-masked; masked_lora: the merged export; full: the
trained model) -- gets ``||X Wᵀ - X W'ᵀ||_F / ||X Wᵀ||_F`` for every prunable layer, with
``X`` the dense model's inputs to that layer on the first calibration windows (see
:mod:`prunetune.analysis`). The stage is keyed on the keys of the stages it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from prunetune.analysis import input_grams, layer_weights, reconstruction_errors
from prunetune.data import calibration_samples
from prunetune.evaluate import default_seqlen
from prunetune.loading import load_model
from prunetune.pipeline.stages import StageResult, stage_hash
from prunetune.pruning.api import DEFAULT_SEQLEN_CAP

Loader = Callable[[], dict]  # () -> qualified layer name -> (out, in) weight


def error_stage(pipeline, configurations: dict[str, tuple[str, Loader]]) -> StageResult | None:
    """Run (or reuse) the stage; None when the config turns it off or nothing was pruned.

    Args:
        pipeline: the running :class:`prunetune.pipeline.Pipeline`.
        configurations: report name -> (key of the stage that made it, a function loading its weights).
    """
    windows = pipeline.reconstruction_windows()
    if not windows or not configurations:
        return None
    calibration = pipeline.config.calibration
    inputs = {**pipeline.base_inputs(), "calibration": asdict(calibration), "windows": windows,
              "calibration_data": pipeline.identity("data", calibration.dataset),
              "configurations": {name: key for name, (key, _) in configurations.items()}}

    def work(directory: Path) -> dict:
        dense = pipeline.load_dense()
        seqlen = calibration.seqlen or default_seqlen(dense, cap=DEFAULT_SEQLEN_CAP)
        # the first of the windows pruning calibrated on: same source, seed and length
        token_ids = calibration_samples(pipeline.tokenizer(), calibration.dataset, windows, seqlen, seed=calibration.seed)
        grams = input_grams(dense, token_ids, batch_size=pipeline.config.evaluation.batch_size)
        reference = layer_weights(dense)
        del dense
        errors = {name: reconstruction_errors(reference, load(), grams) for name, (_, load) in configurations.items()}
        return {"windows": windows, "seqlen": seqlen, "dataset": calibration.dataset, "errors": errors}

    # Runs sharing a stages folder (demo, tiny-full) compare other sets of configurations: one folder per set.
    folder = f"per-layer_error-{stage_hash(sorted(inputs['configurations'].items()))[:8]}"
    return pipeline.stages.run("per-layer error", inputs, work, folder=folder)


def weights_loader(pipeline, folder: Path, adapter: Path | None = None, remask: bool = False) -> Loader:
    """A function loading the prunable weights of a model folder, with a plain LoRA ``adapter`` merged in."""
    def load() -> dict:
        model = load_model(str(folder), pipeline.load_options())
        if adapter is not None:
            # peft loads only for an adapter's stage (slow to import; prune-only runs need none)
            from prunetune.export import merge_adapter
            from prunetune.recover.adapter import apply_adapter

            model, _ = merge_adapter(apply_adapter(model, str(adapter)), "lora", remask=remask)
        return layer_weights(model)

    return load


def recovered_weights(pipeline, name: str, method: str, pruned: StageResult, stage: StageResult) -> dict:
    """The weights each recovery row was evaluated with: W + BA merged (and re-masked) for lora, the export otherwise."""
    pruned_dir = pruned.directory / (pruned.result.get("model_dir") or pruned.result["export_dir"])  # or a stack's base
    if method == "lora":
        adapter = stage.directory / "train"
        return {name: (stage.key, weights_loader(pipeline, pruned_dir, adapter)),
                f"{name}, merged + remasked": (stage.key, weights_loader(pipeline, pruned_dir, adapter, remask=True))}
    return {name: (stage.key, weights_loader(pipeline, stage.directory / stage.result["export_dir"]))}
