"""The token cache: keyed on the tokenizer's content, hit on a second call, tokenizing only what is needed."""

import json
import os
import time

import pytest
import torch
from factories import make_tokenizer

from prunetune import data
from prunetune.data import tokens
from prunetune.errors import UsageError


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")


def _tokenizer_without_bos():
    """make_tokenizer()'s twin (same class, name, vocabulary and length) that adds no BOS."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = make_tokenizer().get_vocab()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * (1 + i % 4)}) + "\n" for i in range(100)))
    return str(path)


@pytest.fixture()
def encode_calls(monkeypatch):
    """How many batches were tokenized (not read from the cache)."""
    calls = []
    real = tokens._encode

    def counting(batch, **kwargs):
        calls.append(len(batch["text"]))
        return real(batch, **kwargs)

    monkeypatch.setattr(tokens, "_encode", counting)
    return calls


def test_tokenizers_that_differ_in_bos_handling_do_not_share_a_cache(corpus, cache):
    with_bos, without_bos = make_tokenizer(), _tokenizer_without_bos()
    # the key the cache used to have (class:name_or_path:len) cannot tell them apart
    assert (type(with_bos), with_bos.name_or_path, len(with_bos)) == (type(without_bos), without_bos.name_or_path, len(without_bos))
    assert data.tokenizer_fingerprint(with_bos) != data.tokenizer_fingerprint(without_bos)
    assert data.tokenizer_fingerprint(with_bos) == data.tokenizer_fingerprint(make_tokenizer())  # content, not identity
    first = data.training_blocks(with_bos, corpus, 16, cache_dir=cache, validation_percent=0)
    second = data.training_blocks(without_bos, corpus, 16, cache_dir=cache, validation_percent=0)
    assert first[0]["input_ids"][0] == with_bos.bos_token_id and second[0]["input_ids"][0] != with_bos.bos_token_id
    assert first.fingerprint != second.fingerprint
    stream_a, _ = data.eval_stream(with_bos, corpus, cache_dir=cache)
    stream_b, _ = data.eval_stream(without_bos, corpus, cache_dir=cache)
    assert stream_a.shape[1] == stream_b.shape[1] + 1


@pytest.mark.parametrize("change", [
    lambda t: setattr(t, "eos_token", "<unk>"),  # another id appended after every training document
    lambda t: setattr(t, "add_eos_token", True),  # the tokenizer's own EOS
    lambda t: setattr(t, "split_special_tokens", True),  # "</s>" written in a document: one id, or its pieces
], ids=["eos_token", "add_eos_token", "split_special_tokens"])
def test_a_special_token_setting_that_changes_the_ids_changes_the_fingerprint(change):
    """The token cache is keyed on the fingerprint: a setting that changes a document's ids must change it."""
    plain, changed = make_tokenizer(), make_tokenizer()
    change(changed)
    text = ["a </s> b"]
    assert tokens._encode({"text": text}, changed, True) != tokens._encode({"text": text}, plain, True)
    assert data.tokenizer_fingerprint(changed) != data.tokenizer_fingerprint(plain)


def test_a_second_call_reads_the_cache_instead_of_tokenizing(corpus, cache, encode_calls):
    tokenizer = make_tokenizer()
    blocks = data.training_blocks(tokenizer, corpus, 16, cache_dir=cache)
    stream, _ = data.eval_stream(tokenizer, corpus, cache_dir=cache)
    assert encode_calls
    encode_calls.clear()
    again = data.training_blocks(make_tokenizer(), corpus, 16, cache_dir=cache)
    stream_again, _ = data.eval_stream(make_tokenizer(), corpus, cache_dir=cache)
    assert encode_calls == []
    assert torch.equal(again.blocks, blocks.blocks) and torch.equal(stream_again, stream)
    assert again.fingerprint == blocks.fingerprint


def test_a_changed_file_is_tokenized_again(corpus, cache, encode_calls):
    tokenizer = make_tokenizer()
    data.training_blocks(tokenizer, corpus, 16, cache_dir=cache)
    encode_calls.clear()
    with open(corpus, "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    data.training_blocks(tokenizer, corpus, 16, cache_dir=cache)
    assert encode_calls


def test_training_tokenizes_only_the_chunks_it_needs(corpus, cache, encode_calls, monkeypatch):
    monkeypatch.setattr(tokens, "CHUNK_DOCUMENTS", 10)
    tokenizer = make_tokenizer()
    few = data.training_blocks(tokenizer, corpus, 16, max_samples=5, cache_dir=cache, validation_percent=0)
    assert len(few) == 5 and sum(encode_calls) == 10  # 10 documents are > 80 tokens: one chunk was enough
    files = sorted(p.name for p in data.cache_folder(cache).glob("documents-*"))
    assert len(files) == 1
    encode_calls.clear()
    every = data.training_blocks(tokenizer, corpus, 16, cache_dir=cache, validation_percent=0)
    assert sum(encode_calls) == 90  # continues after the cached chunk
    assert torch.equal(every.blocks[:5], few.blocks)
    plain = torch.tensor([i for t in data.load_documents(corpus, "train", cache, validation_percent=0).texts
                          for i in tokenizer(t).input_ids + [tokenizer.eos_token_id]])
    assert torch.equal(every.blocks.reshape(-1), plain[: len(every) * 16])


def test_streaming_gives_the_same_blocks(tmp_path, cache):
    folder = tmp_path / "named"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"streamed text {i}"}) + "\n" for i in range(50)))
    tokenizer = make_tokenizer()
    streamed = data.training_blocks(tokenizer, str(folder), 16, cache_dir=cache, streaming=True)
    loaded = data.training_blocks(tokenizer, str(folder), 16, cache_dir=cache)
    assert torch.equal(streamed.blocks, loaded.blocks)
    with pytest.raises(UsageError, match="Cannot stream"):
        data.training_blocks(tokenizer, str(folder / "train.jsonl"), 16, cache_dir=cache, streaming=True)


def test_a_cache_file_cut_short_is_tokenized_again(corpus, cache):
    tokenizer = make_tokenizer()
    expected = data.training_blocks(tokenizer, corpus, 16, cache_dir=cache).blocks  # a copy, not a view of the file
    (path,) = data.cache_folder(cache).glob("documents-*")
    head = path.read_bytes()[:100]
    path.unlink()  # a new file: truncating the mapped one in place would pull pages from under the blocks above
    path.write_bytes(head)
    assert torch.equal(data.training_blocks(tokenizer, corpus, 16, cache_dir=cache).blocks, expected)


def test_blocks_batch_with_the_default_data_collator(corpus, cache):
    from transformers import default_data_collator

    blocks = data.training_blocks(make_tokenizer(), corpus, 16, cache_dir=cache)
    batch = next(iter(torch.utils.data.DataLoader(blocks, batch_size=4, shuffle=True, collate_fn=default_data_collator)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64


def test_blocks_pickle_as_references_to_their_cache_files(corpus, cache):
    import pickle

    blocks = data.training_blocks(make_tokenizer(), corpus, 16, cache_dir=cache)
    payload = pickle.dumps(blocks)
    assert len(payload) < blocks.blocks.numel()  # fewer bytes than ids: the files are named, not copied
    assert torch.equal(pickle.loads(payload).blocks, blocks.blocks)


def test_a_local_file_is_hashed_once_until_it_changes(tmp_path, cache):
    """The content key of a local file is remembered by its stat (prunetune.digest): its bytes are hashed once."""
    path = tmp_path / "docs.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    hour_ago = int((time.time() - 3600) * 10**9)
    os.utime(path, ns=(hour_ago, hour_ago))  # a file written just now is hashed but not remembered
    first = data.load_documents(str(path), "train", cache)
    (memo,) = (data.cache_folder(cache) / "file-digests").iterdir()
    memo.write_text("0" * 64)  # what a second call reads instead of the file's bytes
    assert data.load_documents(str(path), "train", cache).content_key != first.content_key
    path.write_text("changed\n" * 100)
    os.utime(path, ns=(hour_ago, hour_ago))
    assert len({data.load_documents(str(path), "train", cache).content_key, first.content_key}) == 2
    assert len(list((data.cache_folder(cache) / "file-digests").iterdir())) == 2
