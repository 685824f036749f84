"""Data sources: builtin corpus, local files, Hub protocol (loader stubbed), the three views."""

import json
import sys

import pytest
import torch
from factories import make_tokenizer

from prunetune import data
from prunetune.errors import UsageError


def test_builtin_corpus_is_stdlib_without_tests_and_split_by_file():
    files = data.builtin_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(r.startswith("site-packages") or "/test/" in f"/{r}" or r.rsplit("/", 1)[-1].startswith("test_") for r in rels)
    splits = {s: data.load_documents("builtin", s) for s in data.SPLITS}
    sizes = {s: len(d.texts) for s, d in splits.items()}
    assert sum(sizes.values()) == len(files)
    assert sizes["train"] > 5 * sizes["test"] > 0 and sizes["validation"] > 0
    assert len({d.fingerprint for d in splits.values()}) == 3
    # deterministic: same fingerprint on a second, uncached read
    data._builtin_documents.cache_clear()
    assert data.load_documents("builtin", "test").fingerprint == splits["test"].fingerprint


def test_local_text_jsonl_json_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    assert data.load_documents(str(tmp_path / "a.txt"), "test").texts == ("hello world",)
    assert data.load_documents(str(tmp_path / "b.jsonl"), "train").texts == ("one", "two")
    assert data.load_documents(f"{tmp_path / 'c.json'}:body", "train").texts == ("x", "y")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "d.parquet")
    assert data.load_documents(str(tmp_path / "d.parquet"), "train").texts == ("p", "q")


def test_folder_with_split_files(tmp_path):
    (tmp_path / "train.txt").write_text("train text")
    (tmp_path / "test.txt").write_text("test text")
    assert data.load_documents(str(tmp_path), "train").texts == ("train text",)
    assert data.load_documents(str(tmp_path), "test").texts == ("test text",)
    with pytest.raises(UsageError, match="validation"):
        data.load_documents(str(tmp_path), "validation")


@pytest.mark.parametrize("make_bad, match", [
    (lambda p: str(p / "missing.txt"), "Unknown dataset"),
    (lambda p: "wikitext3", "wikitext2, c4, ptb, builtin"),
    (lambda p: (p / "empty.txt").write_text("   ") and str(p / "empty.txt"), "empty"),
    (lambda p: (p / "bad.txt").write_bytes(b"\xff\xfe\x00bad") and str(p / "bad.txt"), "Cannot read"),
    (lambda p: (p / "rows.jsonl").write_text('{"content": 1}\n') and str(p / "rows.jsonl"), "no 'text' field"),
])
def test_bad_sources_are_clear_errors(tmp_path, make_bad, match):
    with pytest.raises(UsageError, match=match):
        data.load_documents(make_bad(tmp_path), "test")


class FakeRows(dict):
    def __init__(self, column, texts):
        super().__init__({column: texts})
        self.column = column

    def __len__(self):
        return len(self[self.column])

    def select(self, indices):
        return FakeRows(self.column, [self[self.column][i] for i in indices])


def test_hub_sources_follow_the_papers(monkeypatch):
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "allenai/c4":
            return FakeRows("text", [f"doc {i} " * 5 for i in range(1500)])
        if args[0] == "ptb_text_only":
            return FakeRows("sentence", ["a b", "c d"])
        return FakeRows("text", ["line one", "line two"])

    monkeypatch.setattr(data, "_load_hub_dataset", fake_load)
    wiki = data.load_documents("wikitext2", "test")
    assert calls[-1][0] == ("wikitext", "wikitext-2-raw-v1") and calls[-1][1]["split"] == "test"
    assert wiki.joined() == "line one\n\nline two"
    c4_val = data.load_documents("c4", "validation")
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert len(c4_val.texts) == 1100
    data.load_documents("c4", "train")
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert data.load_documents("ptb", "test").joined() == "a b c d"
    tokenizer = make_tokenizer()
    stream, _ = data.eval_stream(tokenizer, "c4", seqlen=4)
    assert stream.shape == (1, 256 * 4)  # 256 x seqlen tokens of the first 1100 documents


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without datasets
    with pytest.raises(UsageError, match="builtin"):
        data.load_documents("wikitext2", "test")


def test_calibration_samples_are_seeded_windows(tmp_path):
    tokenizer = make_tokenizer()
    text = "".join(chr(32 + (i * 7) % 90) for i in range(5000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    a = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=3)
    b = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=3)
    c = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=4)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    stream = data.tokenize_stream(tokenizer, data.load_documents(str(path), "train"))[0]
    for row in a:  # each sample is a real window of the stream
        starts = [s for s in range(stream.numel() - 32) if torch.equal(stream[s : s + 32], row)]
        assert starts
    with pytest.raises(UsageError, match="holds only"):
        data.calibration_samples(tokenizer, str(path), nsamples=1000, seqlen=32)


def test_training_blocks_group_documents(tmp_path):
    tokenizer = make_tokenizer()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "abcdefghij" * 3}) + "\n" for _ in range(4)))
    blocks = data.training_blocks(tokenizer, str(path), block_size=16)
    # 4 documents x (bos + 30 chars + eos) = 128 tokens -> 8 blocks of 16
    assert len(blocks) == 8
    item = blocks[0]
    assert item["input_ids"].shape == (16,) and torch.equal(item["input_ids"], item["labels"])
    assert item["input_ids"][0].item() == tokenizer.bos_token_id
    assert len(data.training_blocks(tokenizer, str(path), block_size=16, max_samples=3)) == 3
    with pytest.raises(UsageError, match="block"):
        data.training_blocks(tokenizer, str(path), block_size=10_000)
