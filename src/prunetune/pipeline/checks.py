"""What a pipeline file's inputs reveal, checked before any stage runs: the model's shapes (no weights
loaded), the device, every local data file as its stage will read it, and every teacher."""

from __future__ import annotations

from prunetune.data import load_documents, resolve
from prunetune.errors import UsageError, require
from prunetune.loading import LoadOptions, check_device, load_config, load_tokenizer, max_positions
from prunetune.modules import prunable_layers, weight_param_shape
from prunetune.pipeline.config import PipelineConfig, setting_key


def check_model_shapes(config: PipelineConfig) -> int:
    """Check ``config`` against the model's skeleton; returns the bytes the per-layer error's Gram matrices take.

    Raises:
        UsageError: an N:M structure that does not tile a prunable layer, a window or block
            longer than the model's context, a model whose decoder blocks cannot be found.
    """
    skeleton = _skeleton(config)
    try:
        layers = prunable_layers(skeleton)
    except UsageError as err:
        raise UsageError(f"config.model: {err}") from err
    for index, spec in enumerate(config.prune):
        pruner = config.prune_config(spec).pruner
        for name, module in layers.items():
            try:
                pruner.check_layer(name, weight_param_shape(module)[1])
            except UsageError as err:
                raise UsageError(f"config.prune[{index}].sparsity_type: {err}") from err
    gram_bytes = sum(8 * weight_param_shape(module)[1] ** 2 for module in layers.values())  # float64 (in, in) each
    limit = max_positions(skeleton)
    if limit is None:
        return gram_bytes
    lengths = {"config.calibration.seqlen": config.calibration.seqlen, "config.evaluation.seqlen": config.evaluation.seqlen}
    for index, spec in enumerate(config.recover):
        for method in spec.methods:
            length = "seqlen" if method == "blockwise" else "block_size"  # blockwise windows; the Trainer's blocks
            lengths[setting_key(spec, method, length, f"config.recover[{index}]")] = spec.for_method(method)[length]
    for key, length in lengths.items():
        require(length is None or length <= limit,
                f"{key}: {length} tokens exceed the {limit} positions of {config.model}; give {limit} or less.")
    return gram_bytes


def _skeleton(config: PipelineConfig):
    """The model built from its config on the meta device: shapes without weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model_config = load_config(config.model, LoadOptions(trust_remote_code=config.trust_remote_code, flag="config.model"))
    try:  # a GGUF file's config comes from its metadata
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"config.model: could not build the model {config.model!r} from its config: {first_line}. "
                         "Give a Hugging Face model folder (config.json + safetensors weights + tokenizer files), a "
                         "GGUF file, or 'tiny' for the bundled model.") from err


def check_inputs(config: PipelineConfig) -> None:
    """Read every input of every entry as its stage will, before the first stage runs.

    Each local data file is read into documents (``datasets`` converts it once, into its cache;
    the stage reads it from there), and each teacher's config and tokenizer are compared with the
    model's. Hub data is not downloaded here.

    Raises:
        UsageError: naming the config key: a device this machine lacks, a local data file that
            holds no readable text, a teacher that does not exist or cannot teach the model.
    """
    # the Trainer and peft (recover.distill) load only for a config that recovers: prune-only runs start faster
    from prunetune.recover.distill import DistillSettings, check_teacher

    check_device(config.device, "config.device")
    reads = {("config.calibration.dataset", config.calibration.dataset, "train", 5.0),
             ("config.evaluation.dataset", config.evaluation.dataset, config.evaluation.split, 5.0)}
    teachers = {}
    for index, spec in enumerate(config.recover):
        where = f"config.recover[{index}]"
        for method in spec.methods:
            settings = spec.for_method(method, where)
            validation = settings["validation_file"]
            reads.add((setting_key(spec, method, "dataset", where), settings["dataset"], "train",
                       0.0 if validation else 5.0))  # the recipe's split: all of it trains beside a validation_file
            if validation is not None:
                reads.add((setting_key(spec, method, "validation_file", where), validation, "validation", 0.0))
            if settings["distill_from"] not in (None, "dense"):
                teachers[(settings["distill_from"], settings["distill_hidden_weight"] > 0)] = \
                    setting_key(spec, method, "distill_from", where)
    for key, source, split, percent in sorted(reads, key=str):
        if resolve(source, key).kind != "local":
            continue
        try:
            load_documents(source, split, validation_percent=percent, flag=key)
        except UsageError as err:
            raise UsageError(f"{key}: {err}") from err
    options = LoadOptions(trust_remote_code=config.trust_remote_code)
    student_tokenizer = load_tokenizer(config.model, options) if teachers else None
    for (teacher, hidden), key in teachers.items():
        settings = DistillSettings(teacher=teacher, hidden_weight=1.0 if hidden else 0.0)
        try:  # the student is a pruned copy of config.model, made later: compared with config.model itself,
            # which may be the teacher (the dense model, or a copy of it, as the pipeline's "dense" names it)
            check_teacher(teacher, config.model, settings, options, student_tokenizer, student_is_dense=True)
        except UsageError as err:  # its messages name the recover flag: here the config key stands first
            raise UsageError(f"{key}: {str(err).replace('--distill_from ', '', 1)}") from err
