"""The hub sources without the Hub: files written in each repository's own layout, read by the real loaders.

Every protocol detail of the Wanda / SparseGPT papers is pinned here: C4's calibration
sampler (a random document longer than seqlen, a random window in it), C4's evaluation text
(validation shard 0, first 1100 documents, " " join, 256 x seqlen cut), WikiText-2's joins
("\\n\\n" for test, " " for train) and PTB's (" "), and the one fast message offline.
"""

import gzip
import json
import random
import time

import pytest
import torch
from factories import make_tokenizer

from prunetune import data
from prunetune.data import views
from prunetune.errors import UsageError

SEQLEN = 32


def _write_json_gz(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")


def _write_parquet(path, column, texts):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), path)


@pytest.fixture(scope="module")
def c4_root(tmp_path_factory):
    """allenai/c4's layout: en/c4-train.00000-of-01024.json.gz and en/c4-validation.00000-of-00008.json.gz."""
    root = tmp_path_factory.mktemp("allenai-c4")
    rng = random.Random(0)
    # documents of exactly SEQLEN tokens (BOS + SEQLEN-1 characters) are not longer than seqlen: never sampled
    train = [("short " * 10)[: SEQLEN - 1] if i % 3 else f"long document {i} " + "x" * rng.randint(40, 120) for i in range(60)]
    _write_json_gz(root / "en" / "c4-train.00000-of-01024.json.gz", train)
    _write_json_gz(root / "en" / "c4-validation.00000-of-00008.json.gz", [f"val{i}" for i in range(1500)])
    return root


@pytest.fixture(scope="module")
def wikitext_root(tmp_path_factory):
    """Salesforce/wikitext's layout: wikitext-2-raw-v1/{split}-00000-of-00001.parquet, blank rows kept."""
    root = tmp_path_factory.mktemp("wikitext")
    for split in ("train", "validation", "test"):
        _write_parquet(root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", "text",
                       ["", f" = {split} = \n", "", f" first {split} line \n", f" second {split} line \n"])
    return root


@pytest.fixture(scope="module")
def ptb_root(tmp_path_factory):
    """The Penn Treebank's Parquet export: penn_treebank/{split}/0000.parquet with a 'sentence' column."""
    root = tmp_path_factory.mktemp("ptb")
    for split in ("train", "validation", "test"):
        _write_parquet(root / "penn_treebank" / split / "0000.parquet", "sentence", [f"{split} a b", "c <unk> d", "e f"])
    return root


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")


def test_c4_calibration_is_a_random_window_of_a_random_document_longer_than_seqlen(c4_root, cache, monkeypatch):
    tokenizer = make_tokenizer()
    samples = data.calibration_samples(tokenizer, str(c4_root), nsamples=16, seqlen=SEQLEN, seed=7, cache_dir=cache)
    # the reference (Wanda / SparseGPT get_c4), draw for draw, with random.Random(seed) for the global seed
    texts = data.load_documents(str(c4_root), "train", cache).texts
    rng, expected = random.Random(7), []
    for _ in range(16):
        while True:
            ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] > SEQLEN:
                break
        start = rng.randint(0, ids.shape[1] - SEQLEN - 1)
        expected.append(ids[:, start : start + SEQLEN])
    assert torch.equal(samples, torch.cat(expected))
    short = tokenizer(texts[1], return_tensors="pt").input_ids[0]
    assert short.numel() == SEQLEN and not any(torch.equal(row, short) for row in samples)  # never an exactly-seqlen doc
    monkeypatch.setattr(views, "C4_ATTEMPTS", 200)  # 100,000 draws per sample before giving up take a minute
    with pytest.raises(UsageError, match="longer than seqlen=500"):
        data.calibration_samples(tokenizer, str(c4_root), nsamples=1, seqlen=500, cache_dir=cache)


def test_c4_evaluation_is_1100_validation_documents_joined_by_a_space_cut_to_256_windows(c4_root, cache):
    tokenizer = make_tokenizer()
    texts = [f"val{i}" for i in range(1100)]
    expected = tokenizer(" ".join(texts), return_tensors="pt").input_ids
    # seqlen 32: 256 x 32 tokens exceed the 1100 documents, so the stream is all of them and no more
    stream, documents = data.eval_stream(tokenizer, str(c4_root), seqlen=SEQLEN, cache_dir=cache)
    assert expected.shape[1] < 256 * SEQLEN and torch.equal(stream, expected)
    assert documents.split == "validation" and documents.joiner == " " and len(documents) == 1100
    assert documents.description.startswith("c4 validation shard 0, first 1,100 documents (papers' protocol)")
    assert documents.description.endswith(f"cut to 256 x {SEQLEN} tokens")
    # seqlen 8: the cut binds, whatever split was asked for (C4 has one evaluation text)
    stream, _ = data.eval_stream(tokenizer, str(c4_root), seqlen=8, split="test", cache_dir=cache)
    assert torch.equal(stream, expected[:, : 256 * 8])


def test_c4_files_load_from_the_hub_layout_through_the_table(c4_root, cache):
    spec = data.HUB_TABLE["c4"]
    assert spec.repo == "allenai/c4" and spec.files["train"] == "en/c4-train.00000-of-01024.json.gz"
    train = data.load_hub(spec, "train", "c4", cache, root=c4_root)
    assert len(train) == 60 and train.protocol is spec and "local copy" in train.description
    assert data.resolve(str(c4_root)).protocol is spec  # a folder in the layout gets the protocol
    streamed = data.load_hub(spec, "validation", "c4", cache, root=c4_root, streaming=True)
    assert [t for batch in streamed.text_batches(500) for t in batch] == [f"val{i}" for i in range(1100)]


def test_wikitext2_joins_test_with_blank_lines_and_train_with_spaces(wikitext_root, cache):
    spec = data.HUB_TABLE["wikitext2"]
    assert (spec.repo, spec.files["test"]) == ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet")
    rows = ["", " = {0} = \n", "", " first {0} line \n", " second {0} line \n"]
    for split, joiner in (("test", "\n\n"), ("validation", "\n\n"), ("train", " ")):
        documents = data.load_hub(spec, split, "wikitext2", cache, root=wikitext_root)
        assert documents.joined() == joiner.join(row.format(split) for row in rows), split
    tokenizer = make_tokenizer()
    stream, documents = data.eval_stream(tokenizer, str(wikitext_root), seqlen=SEQLEN, cache_dir=cache)
    assert torch.equal(stream, tokenizer("\n\n".join(r.format("test") for r in rows), return_tensors="pt").input_ids)
    assert documents.description.startswith("wikitext2 test (papers' protocol)")


def test_ptb_joins_sentences_with_spaces(ptb_root, cache):
    spec = data.HUB_TABLE["ptb"]
    assert spec.column == "sentence" and spec.files["test"] == "penn_treebank/test/0000.parquet"
    for split in data.SPLITS:
        assert data.load_hub(spec, split, "ptb", cache, root=ptb_root).joined() == f"{split} a b c <unk> d e f"


def test_a_missing_file_of_a_local_copy_is_named(c4_root, tmp_path, cache):
    partial = tmp_path / "c4-train-only"
    (partial / "en").mkdir(parents=True)
    (partial / "en" / "c4-train.00000-of-01024.json.gz").write_bytes((c4_root / "en" / "c4-train.00000-of-01024.json.gz").read_bytes())
    with pytest.raises(UsageError, match="--dataset .*has no en/c4-validation.00000-of-00008.json.gz"):
        data.eval_stream(make_tokenizer(), str(partial), seqlen=SEQLEN, cache_dir=cache)


@pytest.mark.parametrize("call, flag", [
    (lambda t, c: data.calibration_samples(t, "c4", 4, SEQLEN, cache_dir=c), "--calib_dataset"),
    (lambda t, c: data.eval_stream(t, "wikitext2", SEQLEN, cache_dir=c), "--dataset"),
    (lambda t, c: data.training_blocks(t, "ptb", SEQLEN, cache_dir=c), "--dataset_name"),
    (lambda t, c: data.training_blocks(t, "c4", SEQLEN, cache_dir=c, streaming=True), "--dataset_name"),
    (lambda t, c: data.load_documents("c4", "train", c, flag="--calib_dataset"), "--calib_dataset"),
])
def test_offline_a_hub_dataset_not_in_the_cache_fails_in_seconds_naming_the_flag(monkeypatch, cache, call, flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UsageError, match=f"{flag} (c4|wikitext2|ptb): this dataset comes from the Hugging Face Hub.*HF_HUB_OFFLINE=1"):
        call(make_tokenizer(), cache)
    assert time.perf_counter() - started < 10


def test_an_unreachable_hub_turns_datasets_offline_for_the_call_only(monkeypatch, cache):
    """Nobody set HF_HUB_OFFLINE: the probe decides, datasets reads only its cache, and its flags are restored."""
    import datasets.config
    import huggingface_hub.constants

    from prunetune import hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "_probe", lambda endpoint: "huggingface.co:443 unreachable (no route)")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    started = time.perf_counter()
    with pytest.raises(UsageError, match="--dataset wikitext2: .*huggingface.co:443 unreachable"):
        data.load_documents("wikitext2", "test", cache)
    assert time.perf_counter() - started < 10
    assert seen == [(True, True)]
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_a_ptb_protocol_file_is_fingerprinted_by_its_content(tmp_path):
    """A pipeline keys its stages on the data: ptb:FILE is the file's content, not a path named 'ptb:...'."""
    from prunetune.pipeline.fingerprints import FingerprintCache, data_identity

    file = tmp_path / "ptb.test.txt"
    file.write_text(" a b \n c d \n")
    first = data_identity(f"ptb:{file}", FingerprintCache())
    file.write_text(" a b \n c e \n")
    assert data_identity(f"ptb:{file}", FingerprintCache())["sha256"] != first["sha256"]
