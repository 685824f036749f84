"""One digest rule for every file cache: an edit is seen even when the file keeps its size and mtime.

The pipeline's fingerprint cache, the data layer's content keys and a GGUF model's identity all
remember a file's sha256 between calls; each must hash again after an in-place edit of the same
length whose mtime is then set back (``touch -d``, ``os.utime``, ``cp -p``).
"""

import hashlib
import os
import time

import pytest

from prunetune import data, gguf
from prunetune.digest import FolderMemo, file_digest, file_stamp
from prunetune.pipeline import FingerprintCache

HOUR_AGO_NS = int((time.time() - 3600) * 10**9)


def _write_old(path, text: str) -> None:
    """Write ``text`` and give the file an hour-old mtime (as a file that was not just written)."""
    path.write_text(text)
    os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_file_digest_remembers_an_unchanged_file_and_sees_an_edit_with_its_mtime_restored(tmp_path):
    path = tmp_path / "data.txt"
    _write_old(path, "first text")
    memo: dict = {}
    assert file_digest(path, memo) == _sha("first text") and len(memo) == 1
    memo[file_stamp(path).key()] = "remembered"  # what an unchanged file's second call returns, unread
    assert file_digest(path, memo) == "remembered"
    _write_old(path, "other text")  # same size, same mtime: only ctime tells
    assert file_digest(path, memo) == _sha("other text")


def test_file_digest_does_not_remember_a_file_written_just_now(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("just written")
    memo: dict = {}
    assert file_digest(path, memo) == _sha("just written") and memo == {}


def test_folder_memo_keeps_digests_between_processes(tmp_path):
    path = tmp_path / "data.txt"
    _write_old(path, "some text")
    file_digest(path, FolderMemo(tmp_path / "memo"))
    assert FolderMemo(tmp_path / "memo").get(file_stamp(path).key()) == _sha("some text")


def test_pipeline_fingerprint_cache_sees_an_edit_with_size_and_mtime_restored(tmp_path):
    path, store = tmp_path / "data.txt", tmp_path / "fingerprints.json"
    _write_old(path, "first text")
    cache = FingerprintCache(store)
    first = cache.file(path)
    cache.save()
    _write_old(path, "other text")
    assert FingerprintCache(store).file(path) == _sha("other text") != first


def test_data_content_key_sees_an_edit_with_size_and_mtime_restored(tmp_path):
    path, cache = tmp_path / "docs.txt", str(tmp_path / "cache")
    _write_old(path, "".join(f"line {i}\n" for i in range(100)))
    first = data.load_documents(str(path), "train", cache).content_key
    _write_old(path, "".join(f"LINE {i}\n" for i in range(100)))
    assert data.load_documents(str(path), "train", cache).content_key != first


@pytest.mark.parametrize("replace", [False, True], ids=["edited in place", "replaced by another file"])
def test_gguf_identity_sees_a_file_changed_with_size_and_mtime_restored(tmp_path, replace):
    path = tmp_path / "model.gguf"
    _write_old(path, "first weights")
    memo: dict = {}
    assert gguf.file_identity(str(path), path, memo)["sha256"] == _sha("first weights")
    if replace:  # another file of the same size and mtime renamed over it (a new inode)
        other = tmp_path / "other.gguf"
        _write_old(other, "other weights")
        os.replace(other, path)
    else:
        _write_old(path, "other weights")
    assert gguf.file_identity(str(path), path, memo)["sha256"] == _sha("other weights")
