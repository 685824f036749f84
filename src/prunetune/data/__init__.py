"""Data: names and paths -> ``datasets`` tables -> calibration windows, evaluation streams, training blocks.

A *source* is one of

* ``wikitext2``, ``c4``, ``ptb``: Hub datasets with the files, splits and joining of the
  Wanda / SparseGPT papers (:mod:`prunetune.data.hub_sources`); a local folder holding one of
  them in the Hub's layout is read the same way;
* ``builtin``: the standard-library sources of the running interpreter, an offline corpus
  every Python install has (:mod:`prunetune.data.builtin`);
* a local ``.txt``/``.md``, ``.jsonl``/``.json`` (field ``text``, or ``path:field``),
  ``.parquet`` file, or a folder of them (:mod:`prunetune.data.local`): files named
  ``train.*``/``validation.*``/``test.*`` give the splits; otherwise ``validation`` and
  ``test`` are a held-out first ``validation_percent`` % (default 5) and ``train`` the rest.

Everything is read through ``datasets`` (memory-mapped Arrow) and tokenized through
``Dataset.map`` into an on-disk cache keyed on the tokenizer's content and the text
(:mod:`prunetune.data.tokens`). Three views are built (:mod:`prunetune.data.views`):
:func:`calibration_samples`, :func:`eval_stream`, :func:`training_blocks`. Every
:class:`Documents` has a ``description`` saying exactly which text it is.
"""

from prunetune.data.builtin import builtin_files
from prunetune.data.documents import Documents
from prunetune.data.hub_sources import HUB_SOURCES, HUB_TABLE, HubSource, load_hub
from prunetune.data.local import _split_path_field, held_out_count  # noqa: F401 - _split_path_field: pipeline/, recipe
from prunetune.data.sources import (
    SOURCES,
    SPLITS,
    TEXT_SUFFIXES,
    check_local_file,
    check_source,
    check_validation_percent,
    describe_sources,
    load_documents,
    resolve,
)
from prunetune.data.tokens import (
    TokenStream,
    cache_folder,
    document_tokens,
    tokenize_stream,
    tokenizer_fingerprint,
)
from prunetune.data.views import (
    BlockDataset,
    calibration_samples,
    eval_stream,
    training_blocks,
)

__all__ = [
    "HUB_SOURCES",
    "HUB_TABLE",
    "SOURCES",
    "SPLITS",
    "TEXT_SUFFIXES",
    "BlockDataset",
    "Documents",
    "HubSource",
    "TokenStream",
    "builtin_files",
    "cache_folder",
    "calibration_samples",
    "check_local_file",
    "check_source",
    "check_validation_percent",
    "describe_sources",
    "document_tokens",
    "eval_stream",
    "held_out_count",
    "load_documents",
    "load_hub",
    "resolve",
    "tokenize_stream",
    "tokenizer_fingerprint",
    "training_blocks",
]
