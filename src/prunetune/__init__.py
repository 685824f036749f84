"""prunetune: prune a large language model, then recover its accuracy without losing sparsity.

Data flows one way: load -> calibrate -> prune -> recover -> evaluate -> export. The public
API is re-exported here; the CLI (``prunetune``) is a thin layer over it.
"""

from prunetune.errors import UsageError
from prunetune.evaluate import PerplexityResult, evaluate_dataset, perplexity
from prunetune.loading import TINY_PATH, LoadOptions, load_model, load_model_and_tokenizer, load_tokenizer
from prunetune.masks import MaskSet, SparsityReport, measure_sparsity
from prunetune.modules import DecoderBlock, find_decoder_blocks, prunable_layers
from prunetune.pruning import PruneConfig, PruneReport, prune

__version__ = "0.1.0"

__all__ = [
    "DecoderBlock",
    "LoadOptions",
    "MaskSet",
    "PerplexityResult",
    "PruneConfig",
    "PruneReport",
    "SparsityReport",
    "TINY_PATH",
    "UsageError",
    "evaluate_dataset",
    "find_decoder_blocks",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "measure_sparsity",
    "perplexity",
    "prunable_layers",
    "prune",
]
