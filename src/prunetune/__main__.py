"""``python -m prunetune``: the same command as ``prunetune`` (e.g. ``python -m prunetune eval --model tiny``)."""

import sys

from prunetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
