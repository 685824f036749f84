"""Every shipped pipeline config loads and validates, so examples never rot."""

from pathlib import Path

import pytest

import prunetune
from prunetune.pipeline import load_config

CONFIGS = sorted((Path(prunetune.__file__).parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama2-7b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)
    labels = [p.label() for p in config.prune]
    assert labels and all(r.prune in labels for r in config.recover)
    for recovery in config.recover:
        for method in recovery.methods:
            assert recovery.for_method(method)["learning_rate"] > 0


def test_demo_and_tiny_full_keep_their_own_reports_and_share_stages():
    by_name = {p.name: load_config(p) for p in CONFIGS}
    demo, full = by_name["demo.yaml"], by_name["tiny-full.yaml"]
    assert Path(demo.output_dir).resolve() != Path(full.output_dir).resolve()  # report.md, plots, results.json
    assert full.stages_root().resolve() == demo.stages_root().resolve()
    # the shared stages are reusable only if every setting the demo's stages hash is the same
    assert (demo.model, demo.dtype, demo.seed, demo.calibration, demo.evaluation) == \
           (full.model, full.dtype, full.seed, full.calibration, full.evaluation)
    assert demo.prune == full.prune[: len(demo.prune)] and demo.recover == full.recover[: len(demo.recover)]


def test_llama2_full_recovery_does_not_train_float16_weights():
    from prunetune.pipeline import recovery_dtype

    config = load_config(Path(prunetune.__file__).parent / "configs" / "llama2-7b.yaml")
    for recovery in config.recover:
        if "full" in recovery.methods:
            assert recovery_dtype("full", config.dtype) in ("auto", "float32", "fp32")  # fp32 master weights
