"""Data sources: builtin corpus, local files through `datasets`, the held-out split rule, errors, the views."""

import gzip
import json

import pytest
import torch
from factories import make_tokenizer

from prunetune import data
from prunetune.errors import UsageError


@pytest.fixture()
def cache(tmp_path):
    """A datasets cache of this test's own (token files and Arrow conversions)."""
    return str(tmp_path / "cache")


def test_builtin_corpus_is_stdlib_without_tests_and_split_by_file():
    files = data.builtin_files()
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 100
    assert not any(r.startswith("site-packages") or "/test/" in f"/{r}" or r.rsplit("/", 1)[-1].startswith("test_") for r in rels)
    splits = {s: data.load_documents("builtin", s) for s in data.SPLITS}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == len(files)
    assert sizes["train"] > 5 * sizes["test"] > 0 and sizes["validation"] > 0
    assert len({d.fingerprint for d in splits.values()}) == 3
    assert splits["test"].description.startswith("builtin test split")
    # deterministic: the same fingerprint on a second read (nothing is kept between calls)
    assert data.load_documents("builtin", "test").fingerprint == splits["test"].fingerprint


def test_local_text_markdown_jsonl_json_parquet_and_gzip(tmp_path, cache):
    whole = {"validation_percent": 0, "cache_dir": cache}
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "n.md").write_text("# title\n\nbody")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "zipped", "url": "u"}) + "\n")
    assert data.load_documents(str(tmp_path / "a.txt"), "test", **whole).texts == ("hello\nworld\n",)  # one document
    assert data.load_documents(str(tmp_path / "n.md"), "test", **whole).texts == ("# title\n\nbody",)
    assert data.load_documents(str(tmp_path / "b.jsonl"), "train", **whole).texts == ("one", "two")
    assert data.load_documents(f"{tmp_path / 'c.json'}:body", "train", **whole).texts == ("x", "y")
    assert data.load_documents(str(tmp_path / "e.jsonl.gz"), "train", **whole).texts == ("zipped",)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["p", None, "q"]}), tmp_path / "d.parquet")
    assert data.load_documents(str(tmp_path / "d.parquet"), "train", **whole).texts == ("p", "q")  # empty cells skipped


def test_folder_with_split_files(tmp_path, cache):
    (tmp_path / "train.txt").write_text("train text")
    (tmp_path / "test.txt").write_text("test text")
    assert data.load_documents(str(tmp_path), "train", cache).texts == ("train text",)
    test = data.load_documents(str(tmp_path), "test", cache)
    assert test.texts == ("test text",) and test.description == f"{tmp_path} test file (test.txt)"
    with pytest.raises(UsageError, match="validation"):
        data.load_documents(str(tmp_path), "validation", cache)


@pytest.mark.parametrize("total, percent, held", [
    (4200, 5, 210), (1, 5, 1), (10, 5, 1), (30, 5, 2), (50, 5, 2), (70, 5, 4), (10, 99, 9), (100, 12.5, 12),
])
def test_held_out_count_is_run_clm_rounding_at_least_one(total, percent, held):
    # run_clm.py's train[:p%] rounds to the closest row (Python's round: 2.5 -> 2); one row at least,
    # and one row left for training
    assert data.held_out_count(total, percent) == held


def test_a_single_file_holds_out_its_first_lines_for_validation_and_test(tmp_path, cache):
    lines = [f"line {i}\n" for i in range(40)]
    path = tmp_path / "docs.txt"
    path.write_text("".join(lines))
    split = {s: data.load_documents(str(path), s, cache) for s in data.SPLITS}
    assert split["validation"].texts == split["test"].texts == ("".join(lines[:2]),)  # 5% of 40 lines
    assert split["train"].texts == ("".join(lines[2:]),)
    assert split["test"].description == f"{path}, held-out first 5% of lines (2 of 40)"
    assert split["train"].description == f"{path}, lines 3-40 (38 of 40; the first 5% are held out)"
    assert len({d.fingerprint for d in split.values()}) == 2  # validation and test are the same text
    whole = data.load_documents(str(path), "train", cache, validation_percent=0)
    assert whole.texts == ("".join(lines),) and "validation_percent=0" in whole.description
    assert data.load_documents(str(path), "test", cache, validation_percent=0).texts == whole.texts
    # records: JSON Lines counts records (not lines: the blank line is no record)
    records = tmp_path / "docs.jsonl"
    records.write_text("\n".join(json.dumps({"text": f"r{i}"}) for i in range(20)).replace("r3\"}", "r3\"}\n"))
    assert data.load_documents(str(records), "validation", cache).texts == ("r0",)
    assert data.load_documents(str(records), "train", cache).texts == tuple(f"r{i}" for i in range(1, 20))


def test_a_folder_without_split_files_holds_out_across_its_files(tmp_path, cache):
    (tmp_path / "a.txt").write_text("a1\na2\n")
    (tmp_path / "b.txt").write_text("b1\nb2\nb3\n")
    assert data.load_documents(str(tmp_path), "test", cache, validation_percent=20).texts == ("a1\n",)
    assert data.load_documents(str(tmp_path), "train", cache, validation_percent=20).texts == ("a2\n", "b1\nb2\nb3\n")


def test_nothing_left_to_train_on_is_a_clear_error(tmp_path, cache):
    path = tmp_path / "one.txt"
    path.write_text("a single line without a line break " * 20)
    assert data.load_documents(str(path), "test", cache).texts == ("a single line without a line break " * 20,)
    with pytest.raises(UsageError, match="has 1 line:.*nothing for the train split.*validation_percent=0"):
        data.load_documents(str(path), "train", cache)
    tokenizer = make_tokenizer()
    with pytest.raises(UsageError, match="nothing for the train split"):
        data.training_blocks(tokenizer, str(path), 16, cache_dir=cache)
    assert len(data.training_blocks(tokenizer, str(path), 16, cache_dir=cache, validation_percent=0)) > 0


@pytest.mark.parametrize("make_bad, match", [
    (lambda p: str(p / "missing.txt"), "missing.txt does not exist"),
    (lambda p: "wikitext3", "wikitext2, c4, ptb, builtin"),
    (lambda p: (p / "empty.txt").write_text("   \n  ") and str(p / "empty.txt"), "empty"),
    (lambda p: (p / "bad.txt").write_bytes(b"\xff\xfe\x00bad") and str(p / "bad.txt"), "Cannot read the text file"),
    (lambda p: (p / "rows.jsonl").write_text('{"content": 1}\n') and str(p / "rows.jsonl"), "Line 1 .* no 'text' field"),
    # line numbers count lines, blank ones included (the old message counted records: 'Record 2')
    (lambda p: (p / "gap.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n') and str(p / "gap.jsonl"),
     "Line 3 of .*gap.jsonl has no 'text' field"),
    (lambda p: (p / "broken.jsonl").write_text('{"text": "a"}\n\n\n{"text": "b\n') and str(p / "broken.jsonl"),
     "Line 4 of .*broken.jsonl is not valid JSON"),
    (lambda p: (p / "array.json").write_text('[{"text": "a"}, {"txt": "b"}]') and str(p / "array.json"),
     "Record 2 of .*array.json has no 'text' field"),
    (lambda p: (p / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n') and str(p / "numbers.jsonl"),
     "Line 1 of .*numbers.jsonl: its 'text' field holds int 1, not a string"),
    (lambda p: (p / "notes.csv").write_text("a,b") and str(p / "notes.csv"), "unsupported file type '.csv'"),
])
def test_bad_sources_are_clear_errors(tmp_path, cache, make_bad, match):
    with pytest.raises(UsageError, match=match):
        data.load_documents(make_bad(tmp_path), "test", cache)


def test_path_shaped_names_are_paths_never_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("./x.txt", "out/typo.txt", "out/typo", "/no/such/folder"):
        with pytest.raises(UsageError, match=f"--calib_dataset {name} does not exist"):
            data.check_source(name, flag="--calib_dataset")


@pytest.mark.parametrize("percent", [-1, 100, "5", True, None])
def test_validation_percent_is_checked(tmp_path, percent):
    (tmp_path / "a.txt").write_text("a\nb\n")
    with pytest.raises(UsageError, match="validation_percent="):
        data.load_documents(str(tmp_path / "a.txt"), "test", validation_percent=percent)


def test_calibration_samples_are_seeded_windows_of_the_train_part(tmp_path, cache):
    tokenizer = make_tokenizer()
    text = "".join(chr(32 + (i * 7) % 90) + ("\n" if i % 50 == 49 else "") for i in range(5000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    a = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=3, cache_dir=cache)
    b = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=3, cache_dir=cache)
    c = data.calibration_samples(tokenizer, str(path), nsamples=8, seqlen=32, seed=4, cache_dir=cache)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    train = data.load_documents(str(path), "train", cache)
    stream = data.tokenize_stream(tokenizer, train, cache)[0]
    assert stream.dtype == torch.int64
    assert torch.equal(stream, tokenizer(train.joined(), return_tensors="pt").input_ids[0])
    import random

    rng = random.Random(3)  # the windows of the papers' code: random.Random(seed).randint over the stream
    starts = [rng.randint(0, stream.numel() - 32 - 1) for _ in range(8)]
    assert torch.equal(a, torch.stack([stream[s : s + 32] for s in starts]))
    with pytest.raises(UsageError, match="holds only"):
        data.calibration_samples(tokenizer, str(path), nsamples=1000, seqlen=32, cache_dir=cache)


def test_training_blocks_group_documents_with_eos(tmp_path, cache):
    tokenizer = make_tokenizer()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "abcdefghij" * 3}) + "\n" for _ in range(4)))
    blocks = data.training_blocks(tokenizer, str(path), block_size=16, cache_dir=cache, validation_percent=0)
    # 4 documents x (bos + 30 chars + eos) = 128 tokens -> 8 blocks of 16
    assert len(blocks) == 8
    item = blocks[0]
    assert item["input_ids"].shape == (16,) and item["input_ids"].dtype == torch.int64
    assert torch.equal(item["input_ids"], item["labels"])
    document = [tokenizer.bos_token_id, *tokenizer("abcdefghij" * 3, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert blocks.blocks.reshape(-1).tolist() == document * 4
    assert len(data.training_blocks(tokenizer, str(path), block_size=16, max_samples=3, cache_dir=cache, validation_percent=0)) == 3
    # default: the first record is held out, training reads the other three
    assert len(data.training_blocks(tokenizer, str(path), block_size=16, cache_dir=cache)) == 6
    with pytest.raises(UsageError, match="block"):
        data.training_blocks(tokenizer, str(path), block_size=10_000, cache_dir=cache)
    with pytest.raises(IndexError):
        blocks[8]


def test_block_dataset_from_a_tensor_keeps_its_api():
    blocks = torch.arange(12).view(3, 4)
    dataset = data.BlockDataset(blocks, "random")
    assert len(dataset) == 3 and dataset.fingerprint == "random" and dataset.blocks is blocks
    assert torch.equal(dataset[-1]["input_ids"], torch.tensor([8, 9, 10, 11]))
