"""The ``prunetune`` command: parse, call the library, turn errors into exit codes.

Each subcommand lives in ``prunetune.commands.<name>`` and exposes ``main(argv) -> int``;
this file only dispatches, configures logging, and maps :class:`UsageError` to exit 2.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys
import textwrap

from prunetune import __version__
from prunetune.errors import UsageError

COMMANDS = {
    "eval": ("prunetune.commands.eval", "perplexity of a model (optionally with a LoRA adapter)"),
    "sparsity": ("prunetune.commands.sparsity", "per-block, per-module and overall sparsity"),
    "prune": ("prunetune.commands.prune", "prune a model (magnitude, wanda, sparsegpt; unstructured or N:M)"),
    "recover": ("prunetune.commands.recover", "recover a pruned model (lora, masked_lora, full)"),
    "merge": ("prunetune.commands.merge", "merge an adapter into a pruned model, keeping its sparsity"),
    "run": ("prunetune.commands.run", "run a pipeline from a YAML config"),
    "demo": ("prunetune.commands.demo", "the full pipeline on the bundled tiny model, offline"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunetune")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return __version__


def _usage() -> str:
    rows = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    return (f"usage: prunetune [-v | -q] [--version] COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n"
            "Progress bars and warnings show by default; -v adds what each step does\n"
            "(-vv: debug); -q shows only errors and results.\n"
            "prunetune COMMAND --help shows a command's main options and examples;\n"
            "prunetune COMMAND --help-all, every option.")


def configure_logging(verbose: int) -> None:
    """Log handlers and levels for the process: -q (verbose -1) errors only, default warnings, -v info, -vv debug.

    Commands show progress bars unless prunetune's logger is set above WARNING (-q): see :func:`progress_bars`.
    """
    level = logging.ERROR if verbose < 0 else logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("prunetune").setLevel(min(level, logging.INFO) if verbose > 0 else level)
    if verbose <= 0:
        import os
        import warnings

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # Libraries warning each other about renamed APIs (PEFT -> transformers 5, transformers -> accelerate's
        # DDP wrapper): nothing a user can act on
        for message in (".*is_gradient_checkpointing.* is deprecated", ".*broadcast_buffers.* is deprecated"):
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        try:  # the library's own progress bars stay; the per-file load/save bars of HF go
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            import huggingface_hub

            huggingface_hub.utils.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
    if verbose < 0:  # -q: no bars (datasets' included: it reads this when imported) and no warnings
        import os
        import warnings

        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        warnings.simplefilter("ignore")


def progress_bars() -> bool:
    """Whether a command shows progress bars: yes unless ``prunetune -q`` (or a caller's logging setup)
    set prunetune's logger above WARNING."""
    return logging.getLogger("prunetune").isEnabledFor(logging.WARNING)


# Errors of the storage, not of prunetune: full disk, quota, read-only file system, permissions.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def report_usage_error(err: UsageError) -> None:
    message = " ".join(str(err).split())
    # Never break inside a flag, path or hyphenated word: the message is copied from.
    lines = textwrap.wrap(message, 100, break_long_words=False, break_on_hyphens=False)
    print("prunetune: error: " + "\n  ".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose, quiet = 0, False
    while argv and argv[0] in ("-v", "-vv", "--verbose", "-q", "--quiet"):
        flag = argv.pop(0)
        if flag in ("-q", "--quiet"):
            quiet = True
        else:
            verbose += 2 if flag == "-vv" else 1
    # -v may also follow the command name; a -q there is the command's own (run, demo and recover take one)
    for flag in ("-v", "-vv", "--verbose"):
        while flag in argv[1:]:
            argv.remove(flag)
            verbose += 2 if flag == "-vv" else 1
    if quiet and verbose:
        print("prunetune: error: -q (quiet) and -v (verbose) contradict each other; give one of them.", file=sys.stderr)
        return 2
    if quiet:
        verbose = -1
    if argv and argv[0] in ("--version", "-V"):
        print(f"prunetune {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prunetune: error: unknown command {name!r}; accepted: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    configure_logging(verbose)
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UsageError as err:
        report_usage_error(err)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        report_usage_error(UsageError(
            f"The storage failed{where}: {err.strerror or err}. Nothing half-written was left in place (outputs appear "
            "whole or not at all); free space or choose another location, then run the command again."))
        return 2
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
