"""``prunetune prune --sparsity_profile`` on the bundled model: a bad profile exits 2 with nothing written;
OWL and a profile file land in the manifest, ``prunetune sparsity`` shows them, and the per-layer
sparsity survives ``recover`` (full, masked_lora merged, blockwise) exactly."""

import json

import pytest

from prunetune.cli import main
from prunetune.loading import LoadOptions, TINY_PATH, load_model
from prunetune.masks import measure_sparsity

pytestmark = pytest.mark.skipif(not (TINY_PATH / "model.safetensors").exists(), reason="the bundled tiny model is missing")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import argparse
    import textwrap

    path = tmp_path_factory.mktemp("profile") / "corpus.txt"  # a small local file: quick to tokenize
    path.write_text("\n\n".join(open(m.__file__).read() for m in (argparse, textwrap, json)))
    return path


def prune_args(corpus, tmp_path, *extra):
    return ["prune", "--model", "tiny", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--calib_dataset",
            str(corpus), "--eval_dataset", "none", "--save", str(tmp_path / "results"),
            "--save_model", str(tmp_path / "model"), *extra]


@pytest.mark.parametrize("profile,ratio,fragment", [
    ({"0": 1.2}, "0.5", "1.2"),
    ({"model.layers.*.mlp.nosuch_proj": 0.5}, "0.5", "nosuch_proj"),
    ({"9": 0.5}, "0.5", "9"),
    ({"0": 0.0, "1": 0.0, "2": 0.0}, "0.8", "cannot meet the target"),
], ids=["out_of_range", "unknown_layer", "unknown_block", "unreachable"])
def test_bad_profile_file_exits_2_and_writes_nothing(corpus, tmp_path, capsys, profile, ratio, fragment):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    code = main(prune_args(corpus, tmp_path, "--sparsity_ratio", ratio, "--sparsity_profile", str(path)))
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "model").exists() and not (tmp_path / "results").exists()


def test_profile_with_nm_refused(corpus, tmp_path, capsys):
    assert main(prune_args(corpus, tmp_path, "--sparsity_type", "2:4", "--sparsity_profile", "owl")) == 2
    assert "N:M" in capsys.readouterr().err and not (tmp_path / "model").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_prune_writes_the_profile_and_sparsity_shows_it(corpus, tmp_path, capsys, method):
    assert main(prune_args(corpus, tmp_path, "--prune_method", method, "--sparsity_ratio", "0.6",
                           "--sparsity_profile", "owl", "--owl_lambda", "0.1")) == 0
    manifest = json.loads((tmp_path / "model" / "prunetune.json").read_text())
    profile = manifest["sparsity_profile"]
    assert profile["kind"] == "owl" and profile["owl"]["lambda"] == 0.1 and profile["owl"]["statistics_seconds"] > 0
    measured = measure_sparsity(load_model(str(tmp_path / "model"), LoadOptions()))
    for module in measured.modules:  # every layer exactly at floor(its ratio * numel)
        assert module.zeros == int(profile["layer_ratios"][module.name] * module.total + 1e-9)
    assert 0 <= 0.6 * measured.total - measured.zeros < len(measured.modules)
    assert len(set(round(r, 6) for r in profile["block_ratios"].values())) > 1
    capsys.readouterr()
    assert main(["sparsity", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "sparsity profile: owl" in out and "outliers" in out


RECOVERY_FLAGS = {
    "full": ["--block_size", "32", "--max_steps", "3"],
    "masked_lora": ["--block_size", "32", "--max_steps", "3", "--lora_target_modules", "all-linear"],
    "blockwise": ["--distill_from", "tiny", "--nsamples", "6", "--seqlen", "32", "--num_train_epochs", "2"],
}


@pytest.mark.parametrize("method", sorted(RECOVERY_FLAGS))
def test_per_layer_sparsity_survives_recovery(corpus, tmp_path, method):
    """Each layer's own ratio of a non-uniform profile, exactly, after full, masked_lora merged, and blockwise."""
    profile = tmp_path / "profile.yaml"
    profile.write_text("0: 0.3\n3: 0.8\n'mlp.down_proj': 0.5\n")
    assert main(prune_args(corpus, tmp_path, "--prune_method", "wanda", "--sparsity_ratio", "0.55",
                           "--sparsity_profile", str(profile))) == 0
    pruned = measure_sparsity(load_model(str(tmp_path / "model"), LoadOptions())).per_module()
    out = tmp_path / "recovered"
    assert main(["recover", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(corpus),
                 "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--recovery_method", method,
                 *RECOVERY_FLAGS[method], "--output_dir", str(out), "--save_strategy", "no",
                 "--disable_tqdm", "true"]) == 0
    if method == "masked_lora":  # an adapter: its merge is the model users ship
        merged = tmp_path / "merged"
        assert main(["merge", "--model", str(tmp_path / "model"), "--adapter", str(out), "--save_model", str(merged)]) == 0
        out = merged
    model = load_model(str(out), LoadOptions())
    recovered = measure_sparsity(model).per_module()
    assert recovered == pruned
    assert len(set(round(v, 3) for v in pruned.values())) > 2  # a non-uniform profile really was kept
    before = dict(load_model(str(tmp_path / "model"), LoadOptions()).named_parameters())
    moved = sum(int((weight != before[name]).sum()) for name, weight in model.named_parameters()
                if "layers." in name and name.endswith("proj.weight"))
    assert moved > 0  # the recovery really changed kept weights


def test_pipeline_prune_entry_takes_the_profile(corpus, tmp_path, capsys):
    import yaml

    from prunetune.pipeline import load_config, run_pipeline

    raw = {"title": "owl", "model": "tiny", "output_dir": str(tmp_path / "run"), "dtype": "float32", "device": "cpu",
           "progress": False, "calibration": {"dataset": str(corpus), "nsamples": 4, "seqlen": 32},
           "evaluation": {"dataset": str(corpus), "seqlen": 32, "max_windows": 2},
           "prune": [{"method": "magnitude", "sparsity_ratio": 0.6, "sparsity_profile": "owl", "owl_lambda": 0.1}]}
    result = run_pipeline(load_config(raw))
    assert "prune magnitude 60% owl" in result.executed
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("prunetune.json")]
    profile = next(m["sparsity_profile"] for m in manifests if m.get("stage") == "prune")
    assert profile["kind"] == "owl" and len(set(profile["block_ratios"].values())) > 1
    bad = tmp_path / "bad.yaml"  # N:M with a profile: refused before any stage runs
    bad.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "bad"),
                                   "prune": [{"method": "wanda", "sparsity_type": "2:4", "sparsity_profile": "owl"}]}))
    assert main(["run", str(bad)]) == 2
    assert "N:M" in capsys.readouterr().err and not (tmp_path / "bad").exists()
