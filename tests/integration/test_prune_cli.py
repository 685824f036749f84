"""``prunetune prune`` from the command line: bad input exits 2 naming the value; a full run
on the bundled model writes the report and a loadable pruned model with its manifest."""

import json

import pytest

from prunetune.cli import main
from prunetune.loading import TINY_PATH

TINY_READY = (TINY_PATH / "model.safetensors").exists()


@pytest.mark.parametrize("extra,fragment", [
    (["--sparsity_ratio", "1.0"], "1.0"),
    (["--sparsity_ratio", "-0.2"], "-0.2"),
    (["--sparsity_type", "4:4"], "4:4"),
    (["--sparsity_type", "2of4"], "2of4"),
    (["--sparsity_type", "2:4", "--sparsity_ratio", "0.7"], "0.7"),
    (["--sparsity_type", "2:4", "--use_variant"], "use_variant"),
    (["--prune_method", "bogus"], "bogus"),
    (["--prune_method", "sparsegpt", "--use_variant"], "use_variant"),
    (["--calib_dataset", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--eval_dataset", "nosuchdata"], "nosuchdata"),
    (["--nsamples", "0"], "nsamples"),
    (["--seqlen", "1"], "seqlen"),
    (["--blocksize", "64"], "blocksize"),
    (["--prune_method", "magnitude", "--true_sequential"], "true_sequential"),
    (["--reconstruct", "--reconstruct_epochs", "0"], "--reconstruct_epochs must be a positive integer, got 0"),
    (["--reconstruct", "--reconstruct_lr", "-0.5"], "--reconstruct_lr must be a positive number, got -0.5"),
    (["--reconstruct", "--reconstruct_batch_size", "0"], "--reconstruct_batch_size must be a positive integer, got 0"),
    (["--reconstruct_epochs", "2"], "--reconstruct_epochs: only used with --reconstruct"),
    (["--prune_method", "magnitude", "--reconstruct"], "magnitude"),
])
def test_bad_input_exits_2_naming_the_value(extra, fragment, capsys):
    assert main(["prune", "--model", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert "error" in err and fragment in err


@pytest.mark.skipif(not TINY_READY, reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)")
def test_layer_shape_checked_before_work(capsys):
    assert main(["prune", "--model", "tiny", "--sparsity_type", "3:7", "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "3:7" in err and "not divisible" in err


@pytest.mark.skipif(not TINY_READY, reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)")
@pytest.mark.parametrize("schedule", [[], ["--true_sequential"]], ids=["parallel", "true_sequential"])
def test_prune_tiny_end_to_end(tmp_path, capsys, schedule):
    import argparse
    import textwrap

    corpus = tmp_path / "corpus.txt"  # a small local file: quicker to tokenize than builtin
    corpus.write_text("\n\n".join(open(m.__file__).read() for m in (argparse, textwrap, json)))
    results, model_dir = tmp_path / "results", tmp_path / "model"
    code = main(["prune", "--model", "tiny", "--prune_method", "wanda", "--sparsity_type", "2:4", "--nsamples", "8",
                 "--seqlen", "64", "--device", "cpu", "--calib_dataset", str(corpus), "--eval_dataset", str(corpus),
                 "--eval_max_windows", "4", "--save", str(results), "--save_model", str(model_dir), *schedule])
    assert code == 0
    out = capsys.readouterr().out
    assert "sparsity 0.5000" in out and "perplexity on" in out
    report = json.loads((results / "prune_report.json").read_text())
    assert report["sparsity_type"] == "2:4" and report["calibration"]["dataset"] == str(corpus)
    assert report["evaluation"]["after"]["perplexity"] > report["evaluation"]["before"]["perplexity"]
    manifest = json.loads((model_dir / "prunetune.json").read_text())
    assert manifest["method"] == "wanda" and manifest["calibration"]["fingerprint"]
    assert manifest["true_sequential"] is bool(schedule)
    assert set(manifest["sparsity"]["per_module"].values()) == {0.5} and "versions" in manifest
    assert main(["sparsity", str(model_dir), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["overall"] == pytest.approx(0.5)


@pytest.mark.skipif(not TINY_READY, reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)")
def test_prune_measures_perplexity_by_default_as_wanda_main_does(tmp_path, capsys):
    common = ["prune", "--model", "tiny", "--prune_method", "magnitude", "--device", "cpu", "--eval_max_windows", "2"]
    assert main([*common, "--save", str(tmp_path / "default")]) == 0  # no --eval_dataset: tiny's default, builtin
    out = capsys.readouterr().out
    assert "perplexity on builtin (" in out and "before" in out and "after" in out
    evaluation = json.loads((tmp_path / "default" / "prune_report.json").read_text())["evaluation"]
    assert evaluation["dataset"] == "builtin" and evaluation["after"]["windows"] == 2
    assert evaluation["after"]["perplexity"] > evaluation["before"]["perplexity"]

    assert main([*common, "--eval_dataset", "none", "--save", str(tmp_path / "none")]) == 0
    assert "perplexity on" not in capsys.readouterr().out
    assert "evaluation" not in json.loads((tmp_path / "none" / "prune_report.json").read_text())


def test_prune_without_reachable_default_data_notes_it_and_prunes(tmp_path, capsys, monkeypatch):
    """A model not made from tiny defaults to WikiText-2; offline and uncached, that is a note, not a lost run."""
    from factories import save_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    save_model_folder(tmp_path / "model", "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: " + "abcdefghij" * 8 for i in range(200)))
    assert main(["prune", "--model", str(tmp_path / "model"), "--prune_method", "wanda", "--calib_dataset", str(corpus),
                 "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--save", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "perplexity not measured: the default evaluation data wikitext2" in err and "--eval_dataset" in err
    assert "perplexity not measured" not in out  # the explanation is in one place: stderr
    assert "sparsity 0.5000" in out and (tmp_path / "out" / "prune_report.json").exists()


def _forbid(monkeypatch, module, name, what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} before the data was checked")

    monkeypatch.setattr(module, name, refuse)


def test_unavailable_default_calibration_data_is_refused_before_any_weights_load(tmp_path, capsys, monkeypatch):
    """No data flags on a model not made from tiny: the default C4, offline and uncached, is refused first."""
    import prunetune.loading
    from factories import save_model_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    save_model_folder(tmp_path / "model", "llama")
    _forbid(monkeypatch, prunetune.loading, "load_model", "the weights loaded")
    assert main(["prune", "--model", str(tmp_path / "model"), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # one message, on stderr
    assert captured.err.startswith("prunetune: error: --calib_dataset c4: this dataset comes from the Hugging Face Hub")
    assert "perplexity not measured" not in captured.err


def test_too_little_calibration_text_is_refused_before_the_perplexity_pass(tmp_path, capsys, monkeypatch):
    import prunetune.evaluate

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: " + "abcdefghij" * 4 for i in range(50)))
    _forbid(monkeypatch, prunetune.evaluate, "evaluate_dataset", "the perplexity pass ran")
    assert main(["prune", "--model", "tiny", "--calib_dataset", str(corpus), "--eval_dataset", "builtin", "--nsamples",
                 "500", "--seqlen", "64", "--device", "cpu", "--save", str(tmp_path / "out")]) == 2
    assert "Calibration asks for 500 x 64 = 32000 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not TINY_READY, reason=f"the bundled tiny model is not trained yet ({TINY_PATH / 'model.safetensors'} missing)")
def test_prune_reconstruct_end_to_end(tmp_path, capsys):
    results, model_dir = tmp_path / "results", tmp_path / "model"
    code = main(["prune", "--model", "tiny", "--sparsity_type", "2:4", "--nsamples", "8", "--seqlen", "32",
                 "--device", "cpu", "--calib_dataset", "builtin", "--eval_dataset", "none", "--reconstruct",
                 "--reconstruct_epochs", "2", "--reconstruct_lr", "1e-3", "--reconstruct_batch_size", "4",
                 "--save", str(results), "--save_model", str(model_dir)])
    assert code == 0
    assert "sparsity 0.5000" in capsys.readouterr().out
    report = json.loads((results / "prune_report.json").read_text())
    manifest = json.loads((model_dir / "prunetune.json").read_text())
    for summary in (report["reconstruction"], manifest["reconstruction"]):
        assert (summary["epochs"], summary["learning_rate"], summary["batch_size"]) == (2, 1e-3, 4)
        assert all(b["error_after"] < b["error_before"] for b in summary["blocks"]) and summary["blocks"]
    assert set(manifest["sparsity"]["per_module"].values()) == {0.5}
