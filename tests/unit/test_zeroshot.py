"""Zero-shot accuracy through lm-eval: settings, the offline next-line task, the numbers, masks, offline errors.

The model is the bundled ``tiny`` one and every task runs on local files, so nothing here needs
the Hub. Tests that need lm-eval's full task index (10-15 s to build on 2 cores) share one.

Run: ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q tests/unit/test_zeroshot.py``
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from factories import prune_half_rows

from prunetune.errors import UsageError
from prunetune.zeroshot import (
    NEXT_LINE_TASK,
    SEVEN_TASKS,
    TaskCatalog,
    ZeroShotSettings,
    check_settings,
    evaluate_zeroshot,
    format_table,
    mean_of,
    parse_limit,
    parse_tasks,
    write_local_task,
    write_next_line_task,
)
from prunetune.zeroshot.local import next_line_examples
from prunetune.zeroshot.results import metrics_of

pytest.importorskip("lm_eval")

LIMIT = 40


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_next_line_task(folder, examples=60, fewshot_examples=8)
    return folder


@pytest.fixture(scope="module")
def tiny():
    from prunetune.loading import load_model, load_tokenizer

    return load_model("tiny"), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def full_catalog():
    """lm-eval's whole index (built once for the module)."""
    catalog = TaskCatalog()
    catalog.full_manager()
    return catalog


def settings(task_dir, **changes) -> ZeroShotSettings:
    return ZeroShotSettings(**{"tasks": [NEXT_LINE_TASK], "limit": LIMIT, "include_path": str(task_dir), **changes})


def scores(model, tokenizer, task_dir, **changes) -> dict:
    return evaluate_zeroshot(model, tokenizer, settings(task_dir, **changes)).to_dict()


# ---- settings, checked without lm-eval or a model


def test_task_names_are_split_stripped_and_deduplicated():
    assert parse_tasks(" boolq, rte,,boolq ") == ["boolq", "rte"]
    assert parse_tasks(["arc_easy", "arc_challenge"]) == ["arc_easy", "arc_challenge"]


@pytest.mark.parametrize("value, message", [
    (",", "names no task"),
    ("boolq rte", "'boolq rte' is not a task name"),
    (3, "3 is not accepted"),
])
def test_bad_task_lists_are_refused(value, message):
    with pytest.raises(UsageError, match=message):
        parse_tasks(value)


@pytest.mark.parametrize("change, message", [
    ({"limit": 0}, "--limit 0 is not accepted; give a whole number"),
    ({"limit": -3}, "--limit -3 is not accepted"),
    ({"limit": 0.5}, "--limit 0.5 is not accepted"),
    ({"limit": True}, "--limit True is not accepted"),
    ({"num_fewshot": -1}, "--num_fewshot -1 is not accepted"),
    ({"batch_size": 0}, "--batch_size 0 is not accepted"),
    ({"include_path": "no/such/folder"}, "--include_path no/such/folder does not exist"),
    ({"tasks": []}, "--tasks names no task"),
])
def test_bad_settings_are_refused_naming_the_value(task_dir, change, message):
    with pytest.raises(UsageError, match=message):
        check_settings(settings(task_dir, **change))


def test_include_path_must_be_a_folder_of_yaml_files(tmp_path):
    (tmp_path / "file.yaml").write_text("task: x\n")
    with pytest.raises(UsageError, match="is a file"):
        check_settings(ZeroShotSettings(tasks=["x"], include_path=str(tmp_path / "file.yaml")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .yaml file"):
        check_settings(ZeroShotSettings(tasks=["x"], include_path=str(tmp_path / "empty")))


def test_limit_text_must_be_a_whole_number():
    assert parse_limit("25") == 25
    with pytest.raises(UsageError, match="--limit 0.25 is not accepted"):
        parse_limit("0.25")


def test_without_lm_eval_the_message_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(UsageError, match=r'not installed.*pip install "prunetune\[zeroshot\]"'):
        TaskCatalog().check_names(["boolq"])


def test_pipeline_evaluation_keys_are_checked_at_load(task_dir, tmp_path):
    from prunetune.pipeline import load_config

    base = {"model": "tiny", "output_dir": str(tmp_path / "run")}
    config = load_config({**base, "evaluation": {"tasks": f"{NEXT_LINE_TASK}", "include_path": str(task_dir), "limit": 5}})
    assert config.evaluation.tasks == [NEXT_LINE_TASK]
    assert config.evaluation.zeroshot_settings().limit == 5
    assert load_config(base).evaluation.zeroshot_settings() is None
    for evaluation, message in [({"tasks": [NEXT_LINE_TASK], "include_path": str(task_dir), "limit": 0}, "config.evaluation.limit 0"),
                                ({"tasks": [NEXT_LINE_TASK], "include_path": str(task_dir), "limit": 0.1}, "config.evaluation.limit 0.1"),
                                ({"limit": 10}, "config.evaluation.limit applies to zero-shot tasks"),
                                ({"tasks": [NEXT_LINE_TASK], "include_path": str(tmp_path / "none")}, "config.evaluation.include_path")]:
        with pytest.raises(UsageError, match=message):
            load_config({**base, "evaluation": evaluation})


def test_stage_keys_follow_the_task_files_content(tmp_path):
    """A pipeline must not reuse stages scored on other task data: the identity hashed into their keys changes."""
    from dataclasses import asdict

    from prunetune.pipeline import load_config

    folder = tmp_path / "tasks"
    write_next_line_task(folder, examples=10, fewshot_examples=2)

    def evaluation():
        config = load_config({"model": "tiny", "output_dir": str(tmp_path / "run"), "evaluation": {
            "tasks": [NEXT_LINE_TASK], "include_path": str(folder), "task_identity": "given values are replaced"}})
        return asdict(config.evaluation)

    first = evaluation()
    assert first["task_identity"].startswith("lm-eval ") and "3 task files" in first["task_identity"]
    assert evaluation() == first
    write_next_line_task(folder, examples=10, fewshot_examples=2, seed=1)  # same files, other examples
    assert evaluation()["task_identity"] != first["task_identity"]


# ---- the offline task


def test_next_line_examples_hold_the_true_line_among_lines_of_other_files():
    texts = [f"def f{i}():\n" + "".join(f"    value_{i}_{j} = compute({i}, {j})\n" for j in range(12)) for i in range(6)]
    examples = next_line_examples(texts, 20, seed=3)
    assert examples == next_line_examples(texts, 20, seed=3)  # deterministic
    for example in examples:
        choices, answer = example["choices"], example["choices"][example["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        file = next(i for i, text in enumerate(texts) if example["context"] in text)
        assert texts[file].split(example["context"] + "\n", 1)[1].startswith(answer + "\n")  # the line that follows
        assert all(c not in texts[file] for c in choices if c != answer)  # distractors come from other files
    assert {e["label"] for e in examples} == {0, 1, 2, 3}


def test_the_next_line_task_is_written_with_absolute_data_paths(task_dir):
    definition = (task_dir / f"{NEXT_LINE_TASK}.yaml").read_text()
    rows = [json.loads(line) for line in (task_dir / f"{NEXT_LINE_TASK}.test.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and str(task_dir.resolve()) in definition
    assert 'target_delimiter: "\\n"' in definition


# ---- running lm-eval on the in-memory model


def test_scores_match_lm_evals_simple_evaluate_and_the_callers_rng_is_untouched(tiny, task_dir, monkeypatch):
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # what simple_evaluate adds for its own output (environment and git probes, ~10 s here): not scores
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lambda: None)

    model, tokenizer = tiny
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ours = scores(model, tokenizer, task_dir, num_fewshot=2, limit=20)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws

    theirs = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=[NEXT_LINE_TASK],
                                     num_fewshot=2, limit=20, log_samples=False,
                                     task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    score = ours["tasks"][NEXT_LINE_TASK]
    assert score["metrics"] == metrics_of(theirs["results"][NEXT_LINE_TASK])
    assert score["version"] == theirs["versions"][NEXT_LINE_TASK] == 1.0
    assert score["n_shot"] == 2 and score["examples"] == 20 and score["examples_total"] == 60
    assert ours["lm_eval_version"] == lm_eval.__version__
    assert 0.25 < score["metrics"]["acc"] <= 1.0  # the tiny model reads Python better than chance (4 choices)
    assert ours["mean"] == {"metric": "acc", "value": score["metrics"]["acc"], "tasks": [NEXT_LINE_TASK],
                            "label": "mean acc of the 1 task run"}
    table = format_table(ours)
    assert NEXT_LINE_TASK in table and "mean acc of the 1 task run" in table and "2-shot" in table


def test_a_masked_adapter_is_scored_masked(tiny, task_dir):
    """Applied unmerged (masked), merged, and written into the weights unmasked (W + BA, what PEFT alone would do)."""
    from prunetune.export import merge_adapter
    from prunetune.loading import load_model
    from prunetune.modules import prunable_layers
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_masked_lora

    _, tokenizer = tiny
    setup = setup_masked_lora(prune_half_rows(load_model("tiny")),
                              RecoveryArguments(recovery_method="masked_lora", lora_r=4, lora_target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in setup.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    unmasked = prune_half_rows(load_model("tiny"))
    layers = prunable_layers(unmasked)
    with torch.no_grad():
        for name, module in setup.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                layers[name.removeprefix("base_model.model.")].weight += delta
    masked = scores(setup.model, tokenizer, task_dir)["tasks"][NEXT_LINE_TASK]["metrics"]
    merged = scores(merge_adapter(setup.model, "masked_lora")[0], tokenizer, task_dir)["tasks"][NEXT_LINE_TASK]["metrics"]
    plain = scores(unmasked, tokenizer, task_dir)["tasks"][NEXT_LINE_TASK]["metrics"]
    assert merged["acc"] == masked["acc"] and merged["acc_norm"] == masked["acc_norm"]
    assert plain["acc"] != masked["acc"]


def test_a_generation_task_runs_and_needs_a_generation_config(tiny, task_dir, tmp_path):
    import yaml

    model, tokenizer = tiny
    rows = [json.loads(line) for line in (task_dir / f"{NEXT_LINE_TASK}.test.jsonl").read_text().splitlines()][:6]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"context": r["context"], "answer": r["choices"][r["label"]]}) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump({
        "task": "next_line_generated", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{context}}\n", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 2.0}}))
    run = ZeroShotSettings(tasks=["next_line_generated"], include_path=str(tmp_path))
    result = evaluate_zeroshot(model, tokenizer, run).to_dict()
    score = result["tasks"]["next_line_generated"]
    assert score["output_type"] == "generate_until" and score["examples"] == 6 and "exact_match" in score["metrics"]
    assert result["mean"]["value"] is None and result["mean"]["label"] == "no task reports acc"
    assert "exact_match" in format_table(result)

    saved, model.generation_config = model.generation_config, None
    try:
        with pytest.raises(UsageError, match="next_line_generated is a generation task.*no generation config"):
            evaluate_zeroshot(model, tokenizer, run)
    finally:
        model.generation_config = saved


# ---- results


def test_the_mean_is_over_the_seven_when_all_ran_else_over_the_tasks_run():
    def task(acc):
        return {"metrics": {"acc": acc, "acc_norm": 1.0}}

    seven = {name: task(index / 10) for index, name in enumerate(SEVEN_TASKS)}
    mean = mean_of({**seven, "piqa": task(1.0), "gsm8k": {"metrics": {"exact_match": 0.5}}})
    assert mean["value"] == pytest.approx(sum(range(7)) / 70) and mean["tasks"] == list(SEVEN_TASKS)
    assert mean["label"] == "mean acc of the 7 tasks of Wanda's Table 2"
    partial = mean_of({"boolq": task(0.2), "rte": task(0.6), "gsm8k": {"metrics": {"exact_match": 0.5}}})
    assert partial == {"metric": "acc", "value": pytest.approx(0.4), "tasks": ["boolq", "rte"],
                       "label": "mean acc of the 2 tasks run"}


def test_lm_eval_metric_keys_are_read_per_filter():
    raw = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.25, "sample_len": 4}
    assert metrics_of(raw) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 0.25}


# ---- lm-eval's own tasks: names, offline, local data


def test_unknown_names_are_listed_with_their_closest_matches(full_catalog):
    with pytest.raises(UsageError) as err:
        full_catalog.check_names(["hellaswagg", "boolq"])
    message = str(err.value)
    assert "unknown task 'hellaswagg' (closest: hellaswag" in message and "lm-eval ls tasks" in message
    assert "boolq" not in message.split("lm-eval")[0]  # a known name is not reported


def test_a_hub_task_offline_names_the_task_and_the_local_data_route(full_catalog):
    with pytest.raises(UsageError) as err:
        full_catalog.load(["arc_easy"])
    message = str(err.value)
    assert "task 'arc_easy' reads its examples (allenai/ai2_arc (ARC-Easy)) from the Hugging Face Hub" in message
    assert "--include_path" in message and "write_local_task" in message


def test_a_real_task_runs_on_local_data(tiny, full_catalog, tmp_path):
    """lm-eval's own boolq definition (prompt, choices, version) on a local JSONL file."""
    model, tokenizer = tiny
    data = tmp_path / "boolq.jsonl"
    data.write_text("".join(json.dumps({"passage": f"Passage {i}.", "question": f"is {i} even", "label": int(i % 2 == 0)})
                            + "\n" for i in range(6)))
    folder = tmp_path / "tasks"
    write_local_task(folder, "boolq", {"validation": str(data)}, catalog=full_catalog)
    result = evaluate_zeroshot(model, tokenizer, ZeroShotSettings(tasks=["boolq"], include_path=str(folder))).to_dict()
    score = result["tasks"]["boolq"]
    assert score["examples"] == 6 and score["version"] == 2.0 and score["split"] == "validation"
    assert score["data"] == f"json: {data}" and "acc" in score["metrics"]
    with pytest.raises(UsageError, match="boolq scores its 'validation' split"):
        write_local_task(folder, "boolq", {"train": str(data)}, catalog=full_catalog)
