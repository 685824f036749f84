"""Offline is fast and names the flag: one probe per process, paths are never taken for hub ids."""

import time

import pytest

import prunetune.hub as hub
from prunetune.errors import UsageError
from prunetune.loading import LoadOptions, load_model, load_tokenizer, resolve_model_path


@pytest.fixture()
def unreachable(monkeypatch):
    """A machine without network that nobody told about it (no HF_HUB_OFFLINE)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def probe(endpoint):
        calls.append(endpoint)
        return "huggingface.co:443 unreachable (Name or service not known)"

    monkeypatch.setattr(hub, "_probe", probe)
    return calls


def test_a_hub_id_offline_fails_in_seconds_naming_the_flag(unreachable):
    started = time.perf_counter()
    with pytest.raises(UsageError, match="--model_name_or_path someorg/somemodel.*HF_HUB_OFFLINE=1"):
        load_tokenizer("someorg/somemodel", LoadOptions(flag="--model_name_or_path"))
    with pytest.raises(UsageError, match="--model someorg/somemodel.*local model folder"):
        load_model("someorg/somemodel", LoadOptions())
    assert time.perf_counter() - started < 10
    assert unreachable  # the probe decided, not the library's retries


def test_environment_offline_needs_no_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda endpoint: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert hub.offline_reason() == "HF_HUB_OFFLINE is set"


@pytest.mark.parametrize("name", ["./model", "/abs/model", "~/model", "a/b/c", "out\\\\model"])
def test_path_shapes_are_paths(name):
    assert hub.looks_like_path(name)
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model_path(name)


def test_a_mistyped_folder_below_an_existing_one_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert hub.looks_like_path("out/nonexistent")
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model_path("out/nonexistent")
    assert not hub.looks_like_path("meta-llama/Llama-2-7b-hf")


def test_a_failed_probe_does_not_stick_for_the_process(monkeypatch):
    """One failed probe is remembered briefly (one command asks several times), then asked again."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://probe-sticks.invalid")
    clock = [1000.0]
    monkeypatch.setattr(hub, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}), raising=False)
    network = {"up": False}
    connections = []

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout):
        connections.append(address)
        if not network["up"]:
            raise OSError(101, "Network is unreachable")
        return Connection()

    monkeypatch.setattr(hub.socket, "create_connection", connect)
    assert "unreachable" in hub.offline_reason()
    assert "unreachable" in hub.offline_reason()  # within one command: asked once
    assert len(connections) == 1
    network["up"] = True
    clock[0] += 3600  # an hour later, in the same process (a notebook, a pipeline)
    assert hub.offline_reason() is None
    assert len(connections) == 2


def test_a_mistyped_relative_folder_is_named_as_missing_not_only_as_a_hub_problem(tmp_path, monkeypatch):
    """`--model work/smol-wanda5` from a folder without work/: an org/name hub id by shape, a path by intent."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, load_model):
        with pytest.raises(UsageError, match=r"--model work/smol-wanda5: there is no local folder 'work/smol-wanda5' "
                                             r"\(no such file or folder here\)"):
            load("work/smol-wanda5", LoadOptions())
    # not a valid hub id either: only the missing path is the answer
    with pytest.raises(UsageError, match="Model path 'work/smol wanda5' does not exist"):
        resolve_model_path("work/smol wanda5")
    assert resolve_model_path("someorg/somemodel") == "someorg/somemodel"  # hub ids still pass through
