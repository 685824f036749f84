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
