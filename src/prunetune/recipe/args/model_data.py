"""Which pruned model to recover and on which text: ``ModelArguments`` and ``DataArguments`` (run_clm.py's names).

Values are checked in ``__post_init__``, before anything is loaded; each field's ``help`` is the
CLI help, as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prunetune.data import check_local_file, check_source
from prunetune.errors import UsageError, require
from prunetune.loading import DTYPES
from prunetune.recipe.args.values import is_int, is_number

# Evaluation never scores the training text, so "train" is not an evaluation split here.
EVAL_SPLITS = ("validation", "test")

# run_clm.py flags accepted so its command lines run, rarely needed here (most change nothing):
# `prunetune recover --help` names them in one line, `--help-all` describes each.
RUN_CLM_ONLY = ("torch_dtype", "low_cpu_mem_usage", "use_fast_tokenizer", "dataset_config_name",
                "preprocessing_num_workers", "keep_linebreaks", "overwrite_cache", "streaming")


@dataclass
class ModelArguments:
    """Which pruned model to recover (the run_clm.py names)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The pruned model: a folder from prunetune prune, a hub id, or tiny."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config of the unpruned model (the seed passes it): a folder is checked against the "
                          "model's config, a hub id recorded only."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer to use (default: the model's)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder."})
    dtype: str = field(
        default="auto",
        # full keeps float32 master weights under auto and trains under bf16 autocast on CUDA
        metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16 (--torch_dtype: the same). auto: "
                          "bfloat16 for an adapter's frozen base on CUDA, float32 otherwise."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a hub model (off: it executes remote code)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "run_clm.py's name for --dtype; the same values."})
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: transformers 5 always loads the "
                          "weights without a second copy in memory."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Use the model's fast (Rust) tokenizer, as run_clm.py does by default. false is refused: "
                          "prunetune tokenizes with the fast tokenizer only."},
    )

    def __post_init__(self):
        require(bool(self.model_name_or_path), "--model_name_or_path is required: the pruned model folder, a hub id, or 'tiny'.")
        if self.torch_dtype is not None:
            require(self.torch_dtype in DTYPES, f"Unknown --torch_dtype {self.torch_dtype!r}; accepted: {', '.join(DTYPES)}.")
            require(self.dtype in ("auto", self.torch_dtype),
                    f"--torch_dtype {self.torch_dtype} and --dtype {self.dtype} disagree; they are the same flag "
                    "(run_clm.py's name and prunetune's): give one of them.")
            self.dtype = self.torch_dtype
        require(self.dtype in DTYPES, f"Unknown --dtype {self.dtype!r}; accepted: {', '.join(DTYPES)}.")
        require(self.use_fast_tokenizer is not False,
                "--use_fast_tokenizer false is not supported: prunetune tokenizes with the model's fast (Rust) "
                "tokenizer only; drop the flag.")


@dataclass
class DataArguments:
    """Training and evaluation text (run_clm.py's names)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: builtin (offline corpus), wikitext2, c4, ptb, or a local .txt/.jsonl/"
                          ".json/.parquet file or folder. Default: builtin for tiny and models pruned from it, c4 "
                          "(the seed's) otherwise."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "A local training text (.txt/.jsonl/.json/.parquet), instead of --dataset_name. "
                          "Without --validation_file, part of it is held out for evaluation."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "A local text for evaluation (then all of the training text trains)."},
    )
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Percent of a local text without split files held out for evaluation, never trained "
                          "on (default: 5). 0: none (--do_eval then needs --validation_file)."},
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Accepted for run_clm.py compatibility and ignored: prunetune's named sources fix their files "
                          "(c4: the papers' en shards; wikitext2: wikitext-2-raw-v1)."},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Training sequence length in tokens. Default: the model's context, capped at 1024."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Score at most this many evaluation windows."})
    validation_split: str = field(
        default="validation",
        metadata={"help": f"Split scored by --do_eval: {' or '.join(EVAL_SPLITS)} (C4: its validation shard)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: the fast tokenizer already "
                          "tokenizes in parallel threads."},
    )
    keep_linebreaks: bool = field(
        default=True,
        metadata={"help": "Keep the line breaks of .txt files, as run_clm.py does by default. false is refused: "
                          "prunetune reads a .txt file whole, line breaks included."},
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={"help": "Accepted for run_clm.py command lines; changes nothing: the token cache is keyed on the "
                          "tokenizer's and the text's content, so it never serves stale ids."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training source as a stream instead of converting it first (hub sources, "
                          "JSON/Parquet files named by split): for sources too large to store. Tokenizing stops "
                          "after --max_train_samples blocks."},
    )

    def __post_init__(self):
        require(self.block_size is None or (is_int(self.block_size) and self.block_size >= 2),
                f"--block_size {self.block_size!r} is too small; give an integer of 2 or more.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            require(value is None or (is_int(value) and value > 0), f"--{name} {value!r} must be a positive number of blocks.")
        require(self.validation_split in EVAL_SPLITS,
                f"--validation_split {self.validation_split!r} is not accepted: evaluation never scores the training "
                f"text; accepted: {', '.join(EVAL_SPLITS)}." if self.validation_split == "train" else
                f"--validation_split {self.validation_split!r}; accepted: {', '.join(EVAL_SPLITS)}.")
        percent = self.validation_split_percentage
        require(is_number(percent) and 0 <= percent < 100,
                f"--validation_split_percentage {percent!r} is not accepted: give a percentage from 0 (hold out "
                "nothing) to below 100, e.g. 5.")
        require(self.preprocessing_num_workers is None or (is_int(self.preprocessing_num_workers)
                                                           and self.preprocessing_num_workers > 0),
                f"--preprocessing_num_workers {self.preprocessing_num_workers!r} must be a positive integer.")
        require(self.keep_linebreaks is not False,
                "--keep_linebreaks false is not supported: prunetune reads a .txt file whole, line breaks included; "
                "drop the flag.")
        if self.dataset_name is not None and self.train_file is not None:
            raise UsageError(f"--dataset_name {self.dataset_name} and --train_file {self.train_file} both name the "
                             "training text; give one of them (--validation_file names the evaluation text).")
        if self.dataset_name is not None:
            check_source(self.dataset_name, "--dataset_name")
        for flag in ("train_file", "validation_file"):
            value = getattr(self, flag)
            if value is not None:
                _check_local_file(flag, value)

    @property
    def training_source(self) -> str | None:
        """What trains: --train_file or --dataset_name (None: the model's default)."""
        return self.train_file or self.dataset_name

    @property
    def training_flag(self) -> str:
        """The option that named the training text (or that changes the default one), for messages."""
        return "--train_file" if self.train_file else "--dataset_name"


def _check_local_file(flag: str, value: str) -> None:
    """``--train_file`` / ``--validation_file`` name local text, not a named source."""
    check_local_file(value, f"--{flag}", f", or use --dataset_name {value}")
