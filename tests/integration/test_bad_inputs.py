"""Bad input, command by command: exit 2, one paragraph naming the value, no traceback, nothing written.

Every CLI row runs ``prunetune.cli.main`` in-process from an empty working directory and
checks the same four things: the return code is 2, stderr has no traceback, the message
names the bad value, and no file or folder appeared or changed (neither in the working
directory nor among the fixtures, which include an existing results folder). The API rows
call the library directly and expect :class:`UsageError`, never TypeError/AttributeError.

Run: ``HF_HUB_OFFLINE=1 python -m pytest -q tests/integration/test_bad_inputs.py``

Not here: an unwritable output folder (the tests run as root, for whom every folder is
writable) and a full disk during a save; output-folder behaviour beyond refusals (overwrite,
locks, leftovers, umask) is in test_output_safety.py.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil

import pytest
import torch
from factories import make_model, make_tokenizer, prune_half_rows, save_model_folder

from prunetune.cli import COMMANDS, main
from prunetune.errors import UsageError

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="'cuda' is a valid device on this machine")

RECOVER = "recover --model_name_or_path MODEL --output_dir out"

# Argument files: name -> text (written into the assets folder).
FILES = {
    "lr_fast.yaml": "model_name_or_path: tiny\noutput_dir: out\nlearning_rate: fast\n",
    "r_eight.yaml": "model_name_or_path: tiny\noutput_dir: out\nlora_r: eight\n",
    "recover_list.yaml": "- model_name_or_path\n- tiny\n",
    "recover_cycle.yaml": "model_name_or_path: tiny\noutput_dir: out\nlora_target_modules: &x [*x]\n",
    "recover_list.json": '["model_name_or_path", "tiny"]',
    "recover_typo.yaml": "model_name_or_path: tiny\noutput_dir: out\nlora_rank: 4\n",
    "recover_no_out.yaml": "model_name_or_path: tiny\nmax_steps: 2\n",
    "run_cycle.yaml": "model: tiny\noutput_dir: out\nprune: &x [*x]\n",
    "run_cycle_map.yaml": "model: tiny\noutput_dir: out\ncalibration: &c {dataset: builtin, nested: *c}\n",
    "run_scalar.yaml": "just a sentence\n",
    "run_unknown.yaml": "model: tiny\noutput_dir: out\nprunee: []\n",
    "run_type.yaml": "model: tiny\noutput_dir: out\nseed: zero\n",
    "run_bad_yaml.yaml": "model: tiny\noutput_dir: [out\n",
    "run_min.yaml": "model: tiny\noutput_dir: out\n",
}

# (id, argv with placeholders, substring the message must hold, output paths that must not exist)
CASES = [
    # ---- eval
    ("eval-truncated-weights", "eval --model TRUNC --dataset TEXT", "TRUNC/model.safetensors is corrupt or truncated", []),
    ("eval-garbage-weights", "eval --model GARBAGE --dataset TEXT --json ppl.json", "GARBAGE/model.safetensors", ["ppl.json"]),
    ("eval-nan-model", "eval --model NANMODEL --dataset TEXT --seqlen 32 --max_windows 2 --json ppl.json",
     "weights hold NaN/inf (21 tensor(s), first model.embed_tokens.weight)", ["ppl.json"]),
    pytest.param("eval-device-cuda", "eval --model MODEL --device cuda", "--device 'cuda'", [], marks=NO_GPU),
    ("eval-device-bogus", "eval --model MODEL --device bogus", "--device 'bogus'", []),
    ("eval-device-cuda-99", "eval --model MODEL --device cuda:99", "--device 'cuda:99'", []),
    ("eval-device-meta", "eval --model MODEL --device meta", "--device 'meta'", []),
    ("eval-batch-size-0", "eval --model MODEL --batch_size 0", "--batch_size 0", []),
    ("eval-max-windows-0", "eval --model MODEL --max_windows 0", "--max_windows 0", []),
    ("eval-max-windows-neg", "eval --model MODEL --max_windows -1", "--max_windows -1", []),
    ("eval-seqlen-0", "eval --model MODEL --seqlen 0 --json ppl.json", "--seqlen 0", ["ppl.json"]),
    ("eval-seqlen-neg", "eval --model MODEL --ctx_length -8", "--seqlen -8", []),
    ("eval-seqlen-too-long", "eval --model MODEL --dataset TEXT --seqlen 4096 --json ppl.json",
     "seqlen=4096 exceeds the model's maximum of 256", ["ppl.json"]),
    ("eval-json-is-folder", "eval --model MODEL --json RESULTS", "--json 'RESULTS' is a folder", []),
    ("eval-json-under-file", "eval --model MODEL --json TEXT/ppl.json", "'TEXT' is a file", []),
    ("eval-missing-adapter", "eval --model MODEL --lora_weights no/adapter", "no/adapter does not exist", []),
    ("eval-dtype-choice", "eval --model MODEL --dtype float8", "'float8'", []),
    ("eval-batch-size-type", "eval --model MODEL --batch_size many", "'many'", []),
    ("eval-missing-model", "eval --model ./no/such/model --dataset TEXT", "./no/such/model", []),
    # ---- sparsity
    ("sparsity-truncated", "sparsity TRUNC --json report.json", "TRUNC/model.safetensors", ["report.json"]),
    ("sparsity-json-is-folder", "sparsity MODEL --json RESULTS", "--json 'RESULTS' is a folder", []),
    ("sparsity-json-under-file", "sparsity MODEL --json TEXT/x/report.json", "'TEXT' is a file", []),
    ("sparsity-missing-model", "sparsity ./no/such/model", "./no/such/model", []),
    # ---- prune: argument validation through PruneConfig / check_device, before the model loads
    ("prune-compute-device-bogus", "prune --model MODEL --compute_device bogus --save out", "'bogus'", ["out"]),
    ("prune-compute-device-cuda-99", "prune --model MODEL --compute_device cuda:99 --save out", "'cuda:99'", ["out"]),
    pytest.param("prune-compute-device-cuda", "prune --model MODEL --compute_device cuda --save out", "--compute_device",
                 ["out"], marks=NO_GPU),
    ("prune-device-bogus", "prune --model MODEL --device bogus --save_model out", "--device 'bogus'", ["out"]),
    ("prune-truncated-weights", "prune --model TRUNC --prune_method magnitude --save RESULTS --save_model out",
     "TRUNC/model.safetensors", ["out"]),
    ("prune-batch-size-0", "prune --model MODEL --batch_size 0 --save out", "batch_size must be a positive integer, got 0", ["out"]),
    ("prune-nsamples-0", "prune --model MODEL --nsamples 0 --save out", "got 0", ["out"]),
    ("prune-reconstruct-epochs-0", "prune --model MODEL --reconstruct --reconstruct_epochs 0 --save out",
     "--reconstruct_epochs must be a positive integer, got 0", ["out"]),
    ("prune-ratio", "prune --model MODEL --sparsity_ratio 1.5 --save out", "1.5", ["out"]),
    ("prune-method", "prune --model MODEL --prune_method obs --save out", "'obs'", ["out"]),
    # ---- recover: values checked before anything loads or trains
    ("recover-no-output-dir", "recover --model_name_or_path MODEL --max_steps 2", "--output_dir is required", ["trainer_output"]),
    ("recover-lr-nan", f"{RECOVER} --learning_rate nan", "--learning_rate nan", ["out"]),
    ("recover-lr-negative", f"{RECOVER} --learning_rate -1", "--learning_rate -1", ["out"]),
    ("recover-train-batch-0", f"{RECOVER} --per_device_train_batch_size 0", "--per_device_train_batch_size 0", ["out"]),
    ("recover-eval-batch-0", f"{RECOVER} --per_device_eval_batch_size 0", "--per_device_eval_batch_size 0", ["out"]),
    ("recover-epochs-negative", f"{RECOVER} --num_train_epochs -1", "--num_train_epochs -1", ["out"]),
    ("recover-epochs-0", f"{RECOVER} --num_train_epochs 0", "--num_train_epochs 0.0 with --max_steps -1 trains nothing", ["out"]),
    ("recover-grad-accum-0", f"{RECOVER} --gradient_accumulation_steps 0", "--gradient_accumulation_steps 0", ["out"]),
    ("recover-max-steps", f"{RECOVER} --max_steps -2", "--max_steps -2", ["out"]),
    ("recover-warmup", f"{RECOVER} --warmup_steps -1", "--warmup_steps -1", ["out"]),
    ("recover-logging-steps", f"{RECOVER} --logging_steps 0", "--logging_steps 0", ["out"]),
    ("recover-block-size-0", f"{RECOVER} --block_size 0", "--block_size 0 is too small", ["out"]),
    ("recover-unknown-flag", f"{RECOVER} --lora_rnk 4", "'--lora_rnk' for prunetune recover; did you mean --lora_r", ["out"]),
    ("recover-misspelt-output-dir", "recover --model_name_or_path MODEL --ouput_dir out", "did you mean --output_dir",
     ["out", "trainer_output"]),
    ("recover-flag-type", f"{RECOVER} --lora_r eight", "'eight'", ["out"]),
    ("recover-yaml-type-float", "recover FILES/lr_fast.yaml", "key 'learning_rate': 'fast' is not accepted; expected: number", ["out"]),
    ("recover-yaml-type-int", "recover FILES/r_eight.yaml", "key 'lora_r': 'eight'", ["out"]),
    ("recover-yaml-not-mapping", "recover FILES/recover_list.yaml", "FILES/recover_list.yaml must hold a mapping", []),
    ("recover-json-not-mapping", "recover FILES/recover_list.json", "FILES/recover_list.json must hold a mapping", []),
    ("recover-yaml-cycle", "recover FILES/recover_cycle.yaml", "lora_target_modules[0] refers to itself", ["out"]),
    ("recover-yaml-unknown-key", "recover FILES/recover_typo.yaml", "unknown key 'lora_rank'; did you mean", ["out"]),
    ("recover-yaml-no-output-dir", "recover FILES/recover_no_out.yaml", "--output_dir is required", ["trainer_output"]),
    ("recover-missing-file", "recover FILES/absent.yaml", "absent.yaml does not exist", []),
    # ---- run: pipeline configs fail before any stage
    ("run-cyclic-list", "run FILES/run_cycle.yaml", "prune[0] refers to itself", ["out"]),
    ("run-cyclic-mapping", "run FILES/run_cycle_map.yaml", "calibration.nested refers to itself", ["out"]),
    ("run-not-mapping", "run FILES/run_scalar.yaml", "not str ('just a sentence')", ["out"]),
    ("run-unknown-key", "run FILES/run_unknown.yaml", "unknown key 'prunee'", ["out"]),
    ("run-wrong-type", "run FILES/run_type.yaml", "config.seed: 'zero'", ["out"]),
    ("run-malformed", "run FILES/run_bad_yaml.yaml", "FILES/run_bad_yaml.yaml is not valid YAML", ["out"]),
    ("run-config-is-folder", "run RESULTS", "RESULTS is a folder", []),
    ("run-output-foreign", "run FILES/run_min.yaml --output_dir RESULTS",
     "output_dir RESULTS is not empty and holds no earlier pipeline run", ["out"]),
    # ---- output folders: refused before any work, nothing of the user's touched
    ("prune-save-model-foreign", "prune --model MODEL --prune_method magnitude --save_model RESULTS",
     "--save_model folder RESULTS already exists and is not empty", []),
    ("prune-overwrite-foreign", "prune --model MODEL --prune_method magnitude --save_model RESULTS --overwrite_output_dir",
     "RESULTS is not empty and was not written by prunetune", []),
    ("prune-save-model-cwd", "prune --model MODEL --prune_method magnitude --save_model . --overwrite_output_dir",
     "--save_model folder . is the current directory", []),
    ("prune-save-model-link", "prune --model MODEL --prune_method magnitude --save_model LINK --overwrite_output_dir",
     "LINK is a symbolic link", []),
    ("prune-save-inside-model", "prune --model MODEL --prune_method magnitude --save_model out --save out/logs",
     "inside --save_model", ["out"]),
    ("merge-device-bogus", "merge --model PRUNED --adapter ADAPTER --save_model out --device bogus", "--device 'bogus'", ["out"]),
    ("merge-save-model-foreign", "merge --model PRUNED --adapter ADAPTER --save_model RESULTS",
     "--save_model folder RESULTS already exists and is not empty", []),
    ("merge-save-model-link", "merge --model PRUNED --adapter ADAPTER --save_model LINK --overwrite",
     "LINK is a symbolic link", []),
    ("merge-json-is-folder", "merge --model PRUNED --adapter ADAPTER --save_model out --json RESULTS",
     "--json 'RESULTS' is a folder", ["out"]),
    ("merge-corrupt-adapter", "merge --model PRUNED --adapter BADADAPTER --save_model out",
     "BADADAPTER/adapter_model.safetensors is corrupt", ["out"]),
    ("merge-unfinished-adapter", "merge --model PRUNED --adapter UNFINISHED --save_model out",
     "adapter folder UNFINISHED belongs to a masked_lora run that has not finished", ["out"]),
    ("eval-corrupt-adapter", "eval --model PRUNED --lora_weights BADADAPTER --dataset TEXT --seqlen 32 --json ppl.json",
     "BADADAPTER/adapter_model.safetensors is corrupt", ["ppl.json"]),
    ("eval-unfinished-adapter", "eval --model PRUNED --lora_weights UNFINISHED --dataset TEXT --seqlen 32",
     "adapter folder UNFINISHED belongs to a masked_lora run that has not finished", []),
    ("eval-unfinished-model", "eval --model HALFMODEL --dataset TEXT --seqlen 32",
     "model folder HALFMODEL belongs to a full run that has not finished", []),
    ("recover-output-foreign", "recover --model_name_or_path PRUNED --output_dir RESULTS --max_steps 1",
     "Output folder RESULTS already exists and is not empty", []),
    ("recover-resume-other-method", "recover --model_name_or_path PRUNED --output_dir FULLRUN --recovery_method masked_lora "
     "--resume_from_checkpoint latest", "written by --recovery_method full", []),
    ("recover-full-fp16", "recover --model_name_or_path PRUNED --output_dir out --recovery_method full --dtype float16",
     "float16 master weights", ["out"]),
    # ---- eval --tasks (zero-shot accuracy through lm-eval); the last two index lm-eval's tasks (~12 s each)
    ("eval-tasks-limit-0", "eval --model MODEL --tasks boolq --limit 0 --json zs.json", "--limit 0 is not accepted", ["zs.json"]),
    ("eval-tasks-limit-fraction", "eval --model MODEL --tasks boolq --limit 0.5", "--limit 0.5 is not accepted; give a whole number", []),
    ("eval-tasks-fewshot-neg", "eval --model MODEL --tasks boolq --num_fewshot -1", "--num_fewshot -1 is not accepted", []),
    ("eval-tasks-batch-0", "eval --model MODEL --tasks boolq --batch_size 0", "--batch_size 0 is not accepted", []),
    ("eval-tasks-empty", "eval --model MODEL --tasks ,", "--tasks ',' names no task", []),
    ("eval-tasks-include-missing", "eval --model MODEL --tasks boolq --include_path no/tasks", "--include_path no/tasks does not exist", []),
    ("eval-tasks-include-no-yaml", "eval --model MODEL --tasks boolq --include_path RESULTS",
     "--include_path RESULTS holds no .yaml file", []),
    ("eval-limit-without-tasks", "eval --model MODEL --limit 10", "--limit applies to zero-shot tasks, and no --tasks was given", []),
    ("eval-tasks-seqlen-alone", "eval --model MODEL --tasks boolq --seqlen 32", "with --tasks alone no perplexity runs", []),
    ("eval-tasks-unknown", "eval --model MODEL --tasks hellaswagg --json zs.json", "unknown task 'hellaswagg' (closest: hellaswag",
     ["zs.json"]),
    ("eval-tasks-hub-offline", "eval --model MODEL --tasks arc_challenge --json zs.json",
     "task 'arc_challenge' reads its examples (allenai/ai2_arc (ARC-Challenge)) from the Hugging Face Hub", ["zs.json"]),
    # ---- demo: its output folder is checked before any stage
    ("demo-output-foreign", "demo --output_dir RESULTS", "output_dir RESULTS is not empty and holds no earlier pipeline run", []),
    # ---- the command itself
    ("unknown-command", "frobnicate --model tiny", "unknown command 'frobnicate'", []),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Model folders (good, truncated, garbage, NaN), a text file, argument files, an existing results folder."""
    root = tmp_path_factory.mktemp("assets")
    save_model_folder(root / "model", "llama")
    for name in ("trunc", "garbage"):
        shutil.copytree(root / "model", root / name)
    weights = root / "trunc" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted copy
    (root / "garbage" / "model.safetensors").write_bytes(b"not a safetensors file")
    nan_model = make_model("llama")
    with torch.no_grad():
        for param in nan_model.parameters():
            param.fill_(math.nan)
    nan_model.save_pretrained(root / "nan", safe_serialization=True)
    make_tokenizer().save_pretrained(root / "nan")
    (root / "text.txt").write_text("".join(chr(32 + (i * 13) % 90) for i in range(3000)))
    (root / "files").mkdir()
    for name, text in FILES.items():
        (root / "files" / name).write_text(text)
    (root / "results").mkdir()
    (root / "results" / "earlier.json").write_text("{}\n")  # an earlier run's output: must survive untouched
    (root / "link").symlink_to(root / "results")
    _recovery_assets(root)
    return root


def _recovery_assets(root):
    """A pruned model, its masked adapter (whole, truncated, unfinished), a full run's checkpoint, an unfinished model."""

    from prunetune.outputs import write_json
    from prunetune.recipe.args import RecoveryArguments
    from prunetune.recover.lora import setup_masked_lora

    model = make_model("llama")
    prune_half_rows(model)
    model.save_pretrained(root / "pruned")
    make_tokenizer().save_pretrained(root / "pruned")
    setup = setup_masked_lora(model, RecoveryArguments(recovery_method="masked_lora", lora_r=4))
    setup.model.save_pretrained(root / "adapter")
    write_json(root / "adapter" / "prunetune.json", {**setup.manifest, "complete": True})
    shutil.copytree(root / "adapter", root / "badadapter")
    weights = root / "badadapter" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    shutil.copytree(root / "adapter", root / "unfinished")
    write_json(root / "unfinished" / "prunetune.json", {**setup.manifest, "complete": False})
    shutil.copytree(root / "pruned", root / "halfmodel")
    write_json(root / "halfmodel" / "prunetune.json", {"recovery_method": "full", "complete": False})
    checkpoint = root / "fullrun" / "checkpoint-2"
    shutil.copytree(root / "pruned", checkpoint)
    write_json(checkpoint / "trainer_state.json", {"global_step": 2})
    write_json(checkpoint / "prunetune_checkpoint.json", {"recovery_method": "full", "complete": True, "step": 2})


def snapshot(root) -> dict:
    """Every path under ``root`` with its size and mtime: any write, even a stray temp file, shows."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def substitute(text: str, assets) -> str:
    names = {"MODEL": "model", "TRUNC": "trunc", "GARBAGE": "garbage", "NANMODEL": "nan", "TEXT": "text.txt",
             "FILES": "files", "RESULTS": "results", "LINK": "link", "PRUNED": "pruned", "ADAPTER": "adapter",
             "BADADAPTER": "badadapter", "UNFINISHED": "unfinished", "HALFMODEL": "halfmodel", "FULLRUN": "fullrun"}
    for placeholder, name in sorted(names.items(), key=lambda item: -len(item[0])):  # NANMODEL before MODEL
        text = text.replace(placeholder, str(assets / name))
    return text


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as err:  # argparse's own errors (a bad choice or type) exit 2 after printing usage
        return err.code


def _as_param(case):
    """A row's first item is its test id; pytest.param rows keep their marks."""
    if isinstance(case, type(pytest.param())):
        return pytest.param(*case.values[1:], id=case.values[0], marks=case.marks)
    return pytest.param(*case[1:], id=case[0])


@pytest.mark.parametrize("argv, message, outputs", [_as_param(case) for case in CASES])
def test_bad_input_exits_2(argv, message, outputs, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv, message = substitute(argv, assets).split(), substitute(message, assets)
    before_cwd, before_assets = snapshot(tmp_path), snapshot(assets)
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in " ".join(err.split()), err
    for output in outputs:
        assert not (tmp_path / output).exists(), output
    assert snapshot(tmp_path) == before_cwd
    assert snapshot(assets) == before_assets


def _rows():
    """(id, command, argv tokens, message) of every CLI row, placeholders left in."""
    rows = []
    for case in CASES:
        case_id, argv, message, _ = case.values if isinstance(case, type(pytest.param())) else case
        rows.append((case_id, argv.split()[0], argv.split(), message))
    return rows


def _names(token: str, message: str) -> bool:
    """``message`` holds ``token`` as a whole word (``0`` in ``got 0``, not in ``10``)."""
    return re.search(rf"(?<![\w.-]){re.escape(token)}(?![\w-])", message) is not None


def _given(argv: list[str]) -> list[str]:
    """The tokens of a row after the command; a path also as its folders and its file name."""
    given = []
    for token in argv[1:]:
        parts = token.split("/")
        given += [token, parts[-1], *("/".join(parts[:n]) for n in range(1, len(parts)))]
    return [token for token in given if token]


def _file_words(argv: list[str]) -> list[str]:
    """The words of the argument files a row passes (their bad value is inside the file)."""
    texts = [FILES[token.split("/", 1)[1]] for token in argv if token.startswith("FILES/") and token[6:] in FILES]
    return [word for text in texts for word in re.findall(r"[\w.-]+", text)]


def _named_flags(argv: list[str], message: str) -> set[str]:
    """The flags a row's message is about: a flag it names, or the flag whose value it names."""
    flags = set(re.findall(r"--\w+", message))
    for previous, token in zip(["", *argv], argv):
        if any(_names(part, message) for part in _given(["", token])):
            flags.add(token if token.startswith("--") else previous)
    return {flag for flag in flags if flag.startswith("--")}


# rows whose message names the culprit by another name than the user gave it
NAMED_OTHERWISE = {"eval-nan-model": "the first tensor holding NaN (the model itself is not named)"}


@pytest.mark.parametrize("case_id, command, argv, message", _rows(), ids=[row[0] for row in _rows()])
def test_every_message_names_the_bad_value(case_id, command, argv, message):
    """The expected text names something the user gave: a value, a flag, or a key of the file they passed."""
    if case_id in NAMED_OTHERWISE:
        return
    given = _given(argv) + _file_words(argv) + ([command] if command not in COMMANDS else [])
    assert re.search(r"--\w+", message) or any(_names(token, message) for token in given), \
        f"{case_id}: {message!r} names no flag and none of {given}"


def _families() -> dict[tuple[str, str], set[str]]:
    """(command, family) -> its flags, from the parsers: an argparse group, or (recover) one arguments dataclass.

    A command without a parser of its own (one that takes a path) is one family without flags.
    """
    import dataclasses
    import importlib

    families = {}
    for command, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        if not hasattr(module, "build_parser"):
            families[(command, "arguments")] = set()
            continue
        parser = module.build_parser()
        for dataclass_type in getattr(parser, "dataclass_types", []):  # HfArgumentParser: one family per dataclass
            families[(command, dataclass_type.__name__)] = {f"--{field.name}" for field in dataclasses.fields(dataclass_type)}
        if getattr(parser, "dataclass_types", None):
            continue
        for group in parser._action_groups:
            flags = {flag for action in group._group_actions for flag in action.option_strings if flag.startswith("--")}
            flags -= {"--help", "--help-all", "--help_all"}
            if flags:
                families[(command, group.title)] = flags
    return families


def test_every_command_and_flag_family_has_a_bad_input_row():
    """Derived from the parsers: a new command, argument group or recover dataclass needs a row here."""
    rows = _rows()
    missing = []
    for (command, family), flags in _families().items():
        mine = [row for row in rows if row[1] == command]
        covered = mine if not flags else [row for row in mine if _named_flags(row[2], row[3]) & flags]
        if not covered:
            missing.append(f"{command}: {family} ({', '.join(sorted(flags)[:6])})")
    assert not missing, "no bad-input row for:\n" + "\n".join(missing)


# ---- the Python API: the same errors as UsageError, never TypeError / AttributeError


@pytest.fixture(scope="module")
def tiny():
    from prunetune.loading import load_model, load_tokenizer

    return load_model("tiny"), load_tokenizer("tiny")


def _api_calls():
    from prunetune import (
        PruneConfig,
        evaluate_dataset,
        find_decoder_blocks,
        load_model_and_tokenizer,
        load_tokenizer,
        measure_sparsity,
        perplexity,
        prunable_layers,
        prune,
    )
    from prunetune.config import from_mapping
    from prunetune.loading import check_device, load_model
    from prunetune.pipeline import PipelineConfig
    from prunetune.recipe.args import RecoveryArguments, RecoveryTrainingArguments

    cyclic: list = []
    cyclic.append(cyclic)
    ids = torch.zeros(1, 256, dtype=torch.long)
    return [
        ("prune-none", lambda m, t, a: prune(None, t, PruneConfig(method="magnitude")), "got NoneType"),
        ("prune-path", lambda m, t, a: prune("tiny", t, PruneConfig(method="magnitude")), "got str"),
        ("prune-config-dict", lambda m, t, a: prune(m, t, {"method": "magnitude"}), "config must be a PruneConfig"),
        ("prune-device", lambda m, t, a: PruneConfig(method="magnitude", device="cuda:99"), "'cuda:99'"),
        ("eval-batch-size-0", lambda m, t, a: evaluate_dataset(m, t, "builtin", 64, batch_size=0), "batch_size=0"),
        ("eval-seqlen-str", lambda m, t, a: evaluate_dataset(m, t, "builtin", "64"), "seqlen='64'"),
        ("eval-max-windows-0", lambda m, t, a: evaluate_dataset(m, t, "builtin", 64, max_windows=0), "max_windows=0"),
        ("eval-model-none", lambda m, t, a: evaluate_dataset(None, t, "builtin", 64), "got NoneType"),
        ("eval-tokenizer-none", lambda m, t, a: evaluate_dataset(m, None, "builtin", 64), "tokenizer must be"),
        ("ppl-float-stream", lambda m, t, a: perplexity(m, ids.float(), 64), "token ids"),
        ("device-bogus", lambda m, t, a: check_device("bogus"), "'bogus'"),
        ("load-truncated", lambda m, t, a: load_model(str(a / "trunc")), "trunc/model.safetensors"),
        ("config-cycle", lambda m, t, a: from_mapping(PipelineConfig, {"model": "tiny", "output_dir": "o", "prune": cyclic}),
         "prune[0] refers to itself"),
        ("config-not-mapping", lambda m, t, a: from_mapping(PipelineConfig, ["model"]), "expected a mapping"),
        ("lora-r-type", lambda m, t, a: RecoveryArguments(lora_r="eight"), "--lora_r 'eight'"),
        ("training-no-output-dir", lambda m, t, a: RecoveryTrainingArguments(), "--output_dir is required"),
        ("training-lr-type", lambda m, t, a: RecoveryTrainingArguments(output_dir="o", learning_rate="fast"), "'fast'"),
        ("tokenizer-missing", lambda m, t, a: load_tokenizer("./no/such/model"), "./no/such/model"),
        ("model-and-tokenizer-missing", lambda m, t, a: load_model_and_tokenizer("./no/such/model"), "./no/such/model"),
        ("blocks-path", lambda m, t, a: find_decoder_blocks("tiny"), "model must be a loaded torch.nn.Module (e.g. from prunetune.load_model), got str 'tiny'"),
        ("sparsity-none", lambda m, t, a: measure_sparsity(None), "got NoneType"),
        ("layers-path", lambda m, t, a: prunable_layers("./pruned"), "got str './pruned'"),
    ]


@pytest.mark.parametrize("index", [pytest.param(i, id=row[0]) for i, row in enumerate(_api_calls())])
def test_api_raises_usage_error(index, tiny, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, call, message = _api_calls()[index]
    model, tokenizer = tiny
    with pytest.raises(UsageError) as info:
        call(model, tokenizer, assets)
    assert message in str(info.value)
    assert not list(tmp_path.iterdir())


# Public functions that still fail on a non-model with another error than UsageError: each is checked to
# fail that way, so that once it raises UsageError the test asks for its row in the table above.
API_GAPS: set[str] = set()


def test_api_table_covers_every_public_function():
    """Every function of ``prunetune.__all__`` is called with a bad input by some row (or is a listed gap)."""
    import inspect

    import prunetune

    public = {name for name in prunetune.__all__ if inspect.isfunction(getattr(prunetune, name))}
    called = {name for _, call, _ in _api_calls() for name in (*call.__code__.co_names, *call.__code__.co_freevars)}
    assert public - called - API_GAPS == set(), "public functions with no bad-input row"
    for name in sorted(API_GAPS):
        with pytest.raises(Exception) as info:
            getattr(prunetune, name)("tiny")
        assert not isinstance(info.value, UsageError), f"{name} raises UsageError now: give it a row, drop it from API_GAPS"


def test_nan_model_perplexity_is_an_error_not_nan(assets):
    from prunetune.evaluate import perplexity
    from prunetune.loading import load_model

    model = load_model(str(assets / "nan"))
    with pytest.raises(UsageError, match="weights hold NaN/inf.*first model.embed_tokens.weight"):
        perplexity(model, torch.zeros(1, 64, dtype=torch.long), 32)


# ---- behaviour around the errors


def test_eval_prints_its_result_before_a_failed_json_write(assets, tmp_path, monkeypatch, capsys):
    import prunetune.commands.eval

    def full_disk(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prunetune.commands.eval, "write_json", full_disk)
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(assets / "model"), "--dataset", str(assets / "text.txt"), "--seqlen", "64",
            "--max_windows", "2", "--json", "ppl.json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert '"perplexity"' in captured.out and "perplexity" in captured.out.splitlines()[0]
    assert "No space left on device" in captured.err and "ppl.json" in captured.err and "Traceback" not in captured.err
    assert not list(tmp_path.iterdir())


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prunetune {version('prunetune')}"


def test_trust_remote_code_warns_once(assets, caplog):
    from prunetune.loading import LoadOptions, load_model, load_tokenizer

    options = LoadOptions(trust_remote_code=True)
    with caplog.at_level(logging.WARNING, logger="prunetune.loading"):
        load_tokenizer(str(assets / "model"), options)
        load_model(str(assets / "model"), options)
    warnings = [r for r in caplog.records if "--trust_remote_code" in r.getMessage()]
    assert len(warnings) == 1 and str(assets / "model") in warnings[0].getMessage()


def test_check_device_accepts_this_machines_devices():
    from prunetune.loading import available_devices, check_device

    assert check_device(None) is None
    assert check_device("cpu") == "cpu" and check_device(torch.device("cpu")) == "cpu"
    assert available_devices()[0] == "cpu"
    if torch.cuda.is_available():
        assert check_device("cuda") == "cuda" and check_device("cuda:0") == "cuda:0"
    with pytest.raises(UsageError, match=r"--compute_device 'cuda:99'.*accepted"):
        check_device("cuda:99", "--compute_device")
