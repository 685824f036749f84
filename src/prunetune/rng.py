"""Global random states kept to a call: what a library function draws must not change the caller's draws."""

from __future__ import annotations

import contextlib
import random


@contextlib.contextmanager
def kept_rng_states():
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states come back as they were on exit.

    Used where code the library calls seeds or draws from the global generators: the Trainer
    (``set_seed``) during recovery, lm-eval while it loads tasks and runs.
    """
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
