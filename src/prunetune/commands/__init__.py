"""Subcommands of the ``prunetune`` CLI: each module exposes ``main(argv) -> int``."""
