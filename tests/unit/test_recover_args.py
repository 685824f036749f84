"""`prunetune recover` arguments: the seed's command line, argument files, validation; the sparsity guard."""

import math
from types import SimpleNamespace

import pytest
import torch

from prunetune.commands.recover import parse
from prunetune.errors import UsageError
from prunetune.recover.callbacks import SparsityGuard, TrainingStopped

SEED = ("--model_name_or_path PRUNED --config_name CFG --dataset_name c4 --num_train_epochs 1 --block_size 1024 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 8 --do_train --do_eval --max_train_samples 30000 "
        "--max_eval_samples 128 --learning_rate 1e-4 --overwrite_output_dir --output_dir {out}")


def test_seed_command_parses_unchanged(tmp_path):
    model, data, recovery, training = parse(SEED.format(out=tmp_path).split())
    assert (model.model_name_or_path, model.config_name, data.dataset_name, data.block_size) == ("PRUNED", "CFG", "c4", 1024)
    assert (data.max_train_samples, data.max_eval_samples) == (30000, 128)
    assert (training.learning_rate, training.per_device_train_batch_size, training.num_train_epochs) == (1e-4, 1, 1)
    assert training.do_train and training.do_eval and training.overwrite_output_dir
    assert (recovery.recovery_method, recovery.lora_r, recovery.lora_alpha, recovery.lora_dropout) == ("lora", 8, 16, 0.05)
    assert recovery.target_patterns() == ["q_proj", "v_proj"]


def test_argument_file_and_per_method_defaults(tmp_path):
    path = tmp_path / "recover.yaml"
    path.write_text(f"model_name_or_path: tiny\nrecovery_method: masked_lora\nlora_target_modules: all-linear\noutput_dir: {tmp_path}/o\n")
    model, data, recovery, training = parse([str(path)])
    assert recovery.recovery_method == "masked_lora" and recovery.lora_dropout == 0.0
    assert recovery.target_patterns() == ["all-linear"] and training.logging_steps == 10
    path.write_text("model_name_or_path: tiny\nlora_rank: 3\n")
    with pytest.raises(UsageError, match="lora_rank"):
        parse([str(path)])


@pytest.mark.parametrize("flags, message", [
    ("--recovery_method qlora", "qlora.*lora, masked_lora, full"),
    ("--lora_r 0", "positive rank"),
    ("--lora_dropout 1.5", r"\[0, 1\)"),
    ("--dataset_name /no/such/file.txt", "no/such"),
    ("--block_size 1", "too small"),
])
def test_bad_values_are_usage_errors(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path} {flags}".split())


class FakeCheck:
    def __init__(self):
        self.layers = {"l": None}
        self.drift = {}

    def violations(self):
        return self.drift

    def sparsity(self):
        return 0.5


def test_guard_logs_sparsity_and_stops_on_drift_or_nan(tmp_path):
    check, param = FakeCheck(), torch.nn.Parameter(torch.ones(3))
    guard = SparsityGuard(check, [param])
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=3, log_history=[{"loss": 1.0, "step": 3}])
    logs = {"loss": 1.0}
    guard.on_log(args, state, None, logs=logs)
    assert logs["sparsity"] == 0.5 and state.log_history[-1]["sparsity"] == 0.5
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(TrainingStopped, match="loss is nan.*checkpoint-2"):
        guard.on_log(args, state, None, logs={"loss": math.nan})
    check.drift = {"model.layers.0.mlp.up_proj": 4}
    control = SimpleNamespace(should_log=False, should_save=True)
    with pytest.raises(TrainingStopped, match="4 pruned weights became nonzero.*up_proj"):
        guard.on_step_end(args, state, control)
    check.drift = {}
    with torch.no_grad():
        param[0] = math.inf
    with pytest.raises(TrainingStopped, match="NaN/inf"):
        guard.on_step_end(args, state, control)


@pytest.mark.parametrize("command", ["recover", "merge"])
def test_help_renders(command, capsys):
    from prunetune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert ("--save_model" if command == "merge" else "--recovery_method") in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    ("--learning_rate nan", "--learning_rate nan"),
    ("--learning_rate 0", "--learning_rate 0"),
    ("--per_device_train_batch_size 0", "--per_device_train_batch_size 0"),
    ("--per_device_eval_batch_size 0", "--per_device_eval_batch_size 0"),
    ("--num_train_epochs -1", "--num_train_epochs -1"),
    ("--num_train_epochs 0", "trains nothing"),
    ("--gradient_accumulation_steps 0", "--gradient_accumulation_steps 0"),
    ("--max_steps -2", "--max_steps -2"),
    ("--warmup_steps -1", "--warmup_steps -1"),
    ("--logging_steps 0", "--logging_steps 0"),
    ("--save_steps 0", "--save_steps 0"),
])
def test_training_values_that_would_train_nothing_are_usage_errors(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path} {flags}".split())


def test_max_steps_overrides_zero_epochs_and_output_dir_is_required(tmp_path):
    *_, training = parse(f"--model_name_or_path tiny --output_dir {tmp_path} --num_train_epochs 0 --max_steps 5".split())
    assert (training.max_steps, training.num_train_epochs) == (5, 0)
    with pytest.raises(UsageError, match="--output_dir is required"):
        parse(["--model_name_or_path", "tiny"])


def test_argument_file_types_and_unknown_flags(tmp_path):
    path = tmp_path / "recover.yaml"
    path.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path}/o\nlearning_rate: 1e-4\nlora_alpha: 32\n")
    _, _, recovery, training = parse([str(path)])  # YAML reads 1e-4 as a string; an int alpha is a float
    assert training.learning_rate == 1e-4 and recovery.lora_alpha == 32.0
    path.write_text(f"model_name_or_path: tiny\noutput_dir: {tmp_path}/o\nlora_r: eight\n")
    with pytest.raises(UsageError, match="key 'lora_r': 'eight' is not accepted; expected: integer"):
        parse([str(path)])
    with pytest.raises(UsageError, match="'--lora-rnk'.*did you mean --lora-r"):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path} --lora-rnk 4".split())
    with pytest.raises(UsageError, match="invalid int value: 'eight'"):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path} --lora_r eight".split())


# ---- run_clm.py's flags (issue 10, item 1)

RUN_CLM = ("--model_name_or_path PRUNED --config_name CFG --train_file {data} --validation_split_percentage 10 "
           "--preprocessing_num_workers 4 --torch_dtype float32 --low_cpu_mem_usage --use_fast_tokenizer "
           "--keep_linebreaks --overwrite_cache --num_train_epochs 1 --block_size 1024 --per_device_train_batch_size 1 "
           "--per_device_eval_batch_size 8 --do_train --do_eval --max_train_samples 30000 --max_eval_samples 128 "
           "--learning_rate 1e-4 --gradient_checkpointing --overwrite_output_dir --output_dir {out}")


def test_run_clm_command_line_parses_with_its_meaning(tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("some text\n")
    model, data_args, _, training = parse(RUN_CLM.format(data=data, out=tmp_path / "o").split())
    assert (data_args.train_file, data_args.dataset_name, data_args.training_source) == (str(data), None, str(data))
    assert data_args.training_flag == "--train_file" and data_args.validation_split_percentage == 10
    assert data_args.preprocessing_num_workers == 4 and data_args.keep_linebreaks and data_args.overwrite_cache
    assert model.dtype == "float32" and model.low_cpu_mem_usage and model.use_fast_tokenizer
    assert training.activation_checkpointing is True  # run_clm's name, no deprecation warning
    defaults = parse(f"--model_name_or_path tiny --output_dir {tmp_path}".split())[1]
    assert defaults.validation_split_percentage == 5 and defaults.validation_split == "validation"


def test_gradient_checkpointing_is_taken_without_a_deprecation_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        *_, training = parse(f"--model_name_or_path tiny --output_dir {tmp_path} --gradient_checkpointing".split())
    assert training.activation_checkpointing and training.gradient_checkpointing


@pytest.mark.parametrize("flags, message", [
    ("--use_fast_tokenizer false", "--use_fast_tokenizer false is not supported: .*fast"),
    ("--keep_linebreaks false", "--keep_linebreaks false is not supported: .*line breaks"),
    ("--torch_dtype float16 --dtype bfloat16", "--torch_dtype float16 and --dtype bfloat16 disagree"),
    ("--torch_dtype int8", "Unknown --torch_dtype 'int8'"),
    ("--validation_split_percentage 100", "--validation_split_percentage 100.0 is not accepted"),
    ("--validation_split_percentage -1", "--validation_split_percentage -1.0 is not accepted"),
    ("--validation_split train", "--validation_split 'train' is not accepted: evaluation never scores the training"),
    ("--preprocessing_num_workers 0", "--preprocessing_num_workers 0 must be a positive integer"),
    ("--train_file c4", "--train_file 'c4' names a dataset, not a file.*--dataset_name c4"),
    ("--train_file /no/such/docs.txt", "--train_file /no/such/docs.txt does not exist"),
    ("--validation_file /no/such/val.txt", "--validation_file /no/such/val.txt does not exist"),
    ("--dataset_name builtin --train_file {data}", "--dataset_name builtin and --train_file .* both name the training text"),
    ("--train_file {data}.csv", "unsupported file type"),
])
def test_run_clm_flags_refused_by_name(flags, message, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("some text\n")
    (tmp_path / "docs.txt.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match=message):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path / 'o'} {flags.format(data=data)}".split())


def test_torch_dtype_equal_to_dtype_is_fine(tmp_path):
    model, *_ = parse(f"--model_name_or_path tiny --output_dir {tmp_path} --torch_dtype bf16 --dtype bf16".split())
    assert model.dtype == "bf16"


# ---- small things (issue 10, item 8)

def test_max_steps_zero_is_a_clear_error_and_one_step_is_singular(tmp_path):
    from prunetune.commands.recover import summary
    from prunetune.recipe import RecoveryResult

    with pytest.raises(UsageError, match="--max_steps 0 is not accepted: the Trainer would read it as no limit and train "
                                         "--num_train_epochs 3 epochs"):
        parse(f"--model_name_or_path tiny --output_dir {tmp_path} --max_steps 0".split())
    *_, training = parse(f"--model_name_or_path tiny --output_dir {tmp_path} --max_steps 0 --do_train false --do_eval".split())
    assert not training.do_train  # evaluating only: no steps to count
    result = RecoveryResult(method="lora", model="m", output_dir="o", dataset="builtin", block_size=8, steps=1, tokens=8,
                            train_seconds=1.0, tokens_per_second=8.0, train_loss=1.0, training_text="builtin train split")
    assert "trained 1 step on builtin train split," in summary(result)


def test_recovery_defaults_for_bars_and_evaluation(tmp_path):
    *_, training = parse(f"--model_name_or_path tiny --output_dir {tmp_path}".split())
    # bars by default, whatever the transformers log level; the Trainer's evaluation keeps only its loss
    assert training.disable_tqdm is False and training.prediction_loss_only is True
