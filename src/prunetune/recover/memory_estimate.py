"""Predicted peak GPU memory of ``--recovery_method full``, from the model's shape alone (``--memory_estimate``).

A prediction, never a measurement: ``prunetune recover ... --memory_estimate`` prints it before
any weight is read, and ``benchmarks/full_7b_memory.py`` measures the same setups on a GPU. The
model's shape comes from a config (a local folder, a ``config.json``, a GGUF file's metadata), or
from a built-in table of well-known hub models (:data:`KNOWN_SHAPES`), so a 7B estimate works
offline. The config is instantiated on the ``meta`` device: parameter counts, which layers the
masks cover and each block's size are exact for any architecture.

What one process holds at its peak, per term (P parameters, M of them masked, w bytes per weight):

* weights ``P w``; gradients ``P w`` (the Trainer frees them after each step, so they count only
  in the backward pass and the optimizer step); masks ``M`` bytes (bool on CUDA, see
  :mod:`prunetune.recover.full`); optimizer state from :data:`OPTIMIZERS` (torch AdamW: two moments
  in the weights' dtype; bitsandbytes 8-bit: 1 byte per moment plus a float32 scale per 256
  values, tensors under 4,096 values and, as the Trainer registers them, embeddings in 32 bits).
* activations saved for the backward pass, per token and decoder block, counted from what
  autograd keeps in a Llama-style block with SDPA attention (the CPU test checks the count
  against autograd's own saved tensors): each norm keeps its float32 input and its output,
  each linear layer its input (under autocast one bf16 copy per layer: q, k and v cast the norm
  output three times), attention its q, k, v, output and log-sum-exp, the MLP four
  intermediate-sized tensors. With gradient checkpointing only each block's input is kept and
  one block is recomputed at a time.
* under autocast with float32 weights, the bf16 copies of every linear weight that autocast
  caches for the whole forward pass (2 bytes per linear weight), even with checkpointing.
* the loss: logits as computed, a float32 copy, the saved log-softmax and its gradient.
* optimizer temporaries: a foreach AdamW step (``adamw_torch``) allocates one weight-sized
  tensor (``sqrt`` of the second moment); the fused and 8-bit steps none.
* FSDP2 over N processes: weights, gradients, optimizer state and masks divided by N, plus two
  blocks gathered whole (the running one and the prefetched next); compute in the mixed-precision
  dtype (no autocast copies). Accelerate keeps float32 master weights under FSDP2 with
  ``--bf16`` whatever ``--dtype``. Before the Trainer shards it, every process holds the whole
  model as loaded and its masks (the recipe loads the model onto each GPU), a moment of its own.
  DDP adds a gradient-sized bucket buffer.

The peak is the largest of three moments: the end of the forward pass (activations, autocast
copies, loss), the end of the backward pass (all gradients), the optimizer step (gradients and
step temporaries), each on top of weights, masks and optimizer state. The CUDA context and the
caching allocator's slack come on top of this count (they are outside PyTorch's "allocated").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunetune.errors import UsageError

logger = logging.getLogger(__name__)

GiB = 2**30
GB = 10**9
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizers: one float32 scale per 256 values per moment
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit moments (bitsandbytes' min_8bit_size)

# Well-known shapes, for hub ids that cannot be read offline: the values of each model's config.json.
KNOWN_SHAPES: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, intermediate_size=13824,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-70b-hf": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False),
    "huggyllama/llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                max_position_embeddings=2048, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       max_position_embeddings=8192, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      max_position_embeddings=32768, tie_word_embeddings=False),
}
KNOWN_SHAPES["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]


@dataclass(frozen=True)
class OptimizerMemory:
    """What an optimizer adds: state bytes per parameter, and a weight-sized step temporary or not.

    Attributes:
        state: "adam" (two moments in the weights' dtype), "adam8" (two bitsandbytes 8-bit moments),
            "adam32" (two float32 moments), "one" (one moment in the weights' dtype), "one8" (one 8-bit
            moment), "one32" (one float32 moment), "factored" (Adafactor: a row and a column vector
            per matrix) or "none".
        foreach_temporary: the step allocates one weight-sized tensor (torch's foreach AdamW).
        bitsandbytes: the optimizer comes from bitsandbytes (an optional extra; paged ones need CUDA).
        paged: the state lives in CUDA unified memory and may be evicted to the host under pressure
            (counted on the GPU here: the estimate is for the case where it is not evicted).
    """

    state: str
    foreach_temporary: bool = False
    bitsandbytes: bool = False
    paged: bool = False


OPTIMIZERS: dict[str, OptimizerMemory] = {
    "adamw_torch_fused": OptimizerMemory("adam"),
    "adamw_torch": OptimizerMemory("adam", foreach_temporary=True),
    "adamw_bnb_8bit": OptimizerMemory("adam8", bitsandbytes=True),
    "adamw_8bit": OptimizerMemory("adam8", bitsandbytes=True),
    "paged_adamw_8bit": OptimizerMemory("adam8", bitsandbytes=True, paged=True),
    "paged_adamw_32bit": OptimizerMemory("adam32", bitsandbytes=True, paged=True),
    "lion_8bit": OptimizerMemory("one8", bitsandbytes=True),
    "lion_32bit": OptimizerMemory("one32", bitsandbytes=True),
    "paged_lion_8bit": OptimizerMemory("one8", bitsandbytes=True, paged=True),
    "paged_lion_32bit": OptimizerMemory("one32", bitsandbytes=True, paged=True),
    "rmsprop_bnb_8bit": OptimizerMemory("one8", bitsandbytes=True),
    "rmsprop_bnb_32bit": OptimizerMemory("one32", bitsandbytes=True),
    "sgd": OptimizerMemory("none"),  # the Trainer's sgd has no momentum unless --optim_args sets it
    "adagrad": OptimizerMemory("one"),
    "rmsprop": OptimizerMemory("one"),
    "adafactor": OptimizerMemory("factored"),
}
# The setup README "Several GPUs" and the estimate recommend for a 7B model on one 80 GB GPU.
RECOMMENDED = {"dtype": "bfloat16", "optim": "adamw_bnb_8bit", "gradient_checkpointing": True}


def optimizer_memory(optim: str) -> OptimizerMemory:
    """The memory model of ``--optim``.

    Raises:
        UsageError: an optimizer the estimate does not model.
    """
    try:
        return OPTIMIZERS[optim]
    except KeyError:
        raise UsageError(f"--memory_estimate does not model --optim {optim}; it knows: {', '.join(OPTIMIZERS)}.") from None


def check_optimizer(training_args) -> None:
    """Refuse, before any work, a bitsandbytes optimizer this machine cannot run.

    Raises:
        UsageError: bitsandbytes is not installed, or a paged optimizer without CUDA.
    """
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    memory = OPTIMIZERS.get(optim)
    if memory is None or not memory.bitsandbytes:
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"--optim {optim} needs bitsandbytes, which is not installed: pip install 'prunetune[bnb]' (its 8-bit "
            "optimizers run on CUDA GPUs; recent releases also on CPU). Without it use adamw_torch_fused (the "
            "default), adamw_torch or adafactor.")
    if memory.paged and not torch.cuda.is_available():
        raise UsageError(
            f"--optim {optim} pages its state between GPU and host memory, which needs CUDA, and this machine has no "
            "CUDA device. Use adamw_bnb_8bit (the same 8-bit state, not paged) or adamw_torch_fused.")


# --------------------------------------------------------------------------- the model's shape


@dataclass
class ModelShape:
    """What the estimate needs to know about a model, counted on a ``meta``-device instance.

    Attributes:
        name: the model as given; source: where the shape came from (said in the output).
        params: all parameters; masked: weights of the prunable linear layers (the masks' size);
        linear: weights of every linear layer, the output layer included (autocast copies them);
        block_params: parameters of the largest decoder block (FSDP2 gathers one block at a time);
        matrices: (rows, cols) of every 2-d parameter; small: parameters in tensors under 4,096 values;
        embedding: parameters of embedding layers (the Trainer gives them 32-bit bitsandbytes state).
    """

    name: str
    source: str
    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head size
    vocab: int
    params: int
    masked: int
    linear: int
    block_params: int
    small: int
    embedding: int = 0
    matrices: list[tuple[int, int]] = field(default_factory=list)


def shape_from_config(config, name: str, source: str) -> ModelShape:
    """Count a config's model on the ``meta`` device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from prunetune.modules import find_decoder_blocks, prunable_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    blocks = find_decoder_blocks(model)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                       or getattr(config, "n_inner", None) or 4 * hidden)
    return ModelShape(
        name=name, source=source, model_type=str(getattr(config, "model_type", "?")), hidden=hidden,
        layers=len(blocks), intermediate=intermediate, heads=heads, kv_dim=kv_heads * head_dim,
        vocab=int(config.vocab_size), params=sum(p.numel() for p in params),
        masked=sum(m.weight.numel() for m in prunable_layers(model).values()),
        linear=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        block_params=max((sum(p.numel() for p in block.module.parameters()) for block in blocks), default=0),
        small=sum(p.numel() for p in params if p.numel() < BNB_MIN_8BIT_SIZE),
        embedding=sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()),
        matrices=[tuple(p.shape) for p in params if p.dim() == 2],
    )


def _known(name: str | None) -> str | None:
    if not name:
        return None
    lowered = {key.lower(): key for key in KNOWN_SHAPES}
    return lowered.get(name.strip().rstrip("/").lower())


def model_shape(model_name_or_path: str, config_name: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model a recovery run would load, without loading it.

    In order: ``--config_name`` as a local folder or ``config.json``; ``--model_name_or_path`` as a
    local folder, GGUF file or bundled name; a hub id of :data:`KNOWN_SHAPES` (either flag); else the
    hub (its cache, or the network when reachable).

    Raises:
        UsageError: none of these gives a config.
    """
    from transformers import AutoConfig

    from prunetune.loading import LoadOptions, load_config

    if config_name and Path(config_name).expanduser().exists():
        path = Path(config_name).expanduser()
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UsageError(f"--config_name {config_name}: not a readable transformers config ({err}).") from err
        return shape_from_config(config, model_name_or_path, f"config {path}")
    local = Path(model_name_or_path).expanduser()
    if local.exists() or model_name_or_path in ("tiny", "smollm2-135m"):
        config = load_config(model_name_or_path, LoadOptions(trust_remote_code=trust_remote_code))
        return shape_from_config(config, model_name_or_path, f"config of {model_name_or_path}")
    for given in (model_name_or_path, config_name):
        known = _known(given)
        if known is not None:
            values = dict(KNOWN_SHAPES[known])
            config = AutoConfig.for_model(values.pop("model_type"), **values)
            return shape_from_config(config, model_name_or_path, f"prunetune's built-in shape of {known}")
    try:
        config = load_config(model_name_or_path, LoadOptions(trust_remote_code=trust_remote_code))
    except UsageError as err:
        raise UsageError(
            f"--memory_estimate needs the shape of {model_name_or_path}, and no config could be read ({err}) Give "
            "--config_name a local folder or config.json of the model, or a hub id prunetune knows offline: "
            f"{', '.join(KNOWN_SHAPES)}.") from err
    return shape_from_config(config, model_name_or_path, f"config of {model_name_or_path}")


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class TrainingSetup:
    """The choices the estimate depends on.

    Attributes:
        dtype: the weights' dtype (float32: fp32 master weights; bfloat16).
        optim: the Trainer's ``--optim`` name.
        bf16: bf16 mixed precision (autocast; under FSDP2 the gathered blocks' dtype).
        gradient_checkpointing: recompute each block in the backward pass.
        micro_batch: blocks per device and step; block_size: tokens per block.
        processes: data-parallel processes; fsdp: FSDP2 shards over them (else DDP when > 1).
    """

    dtype: str = "float32"
    optim: str = "adamw_torch_fused"
    bf16: bool = True
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    block_size: int = 1024
    processes: int = 1
    fsdp: bool = False

    def label(self) -> str:
        parts = [f"{self.dtype} weights", "bf16 autocast" if self.bf16 else "no autocast", self.optim,
                 "gradient checkpointing" if self.gradient_checkpointing else "no checkpointing",
                 f"micro-batch {self.micro_batch} x {self.block_size}"]
        if self.processes > 1:
            parts.append(f"{'FSDP2' if self.fsdp else 'DDP'} over {self.processes} processes")
        return ", ".join(parts)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """A predicted peak, with the terms that make it up (bytes, per process).

    Attributes:
        resident: held through the whole step (weights, masks, optimizer state, gathered blocks).
        moments: what comes on top of ``resident`` at each candidate peak moment, by term.
        alone: moments that are not on top of ``resident`` (under FSDP2: the whole model on each GPU
            before the Trainer shards it).
        peak: the largest moment's total; peak_moment: which one.
    """

    shape: ModelShape
    setup: TrainingSetup
    resident: dict[str, int]
    moments: dict[str, dict[str, int]]
    alone: tuple[str, ...] = ()
    peak: int = 0
    peak_moment: str = ""

    def __post_init__(self):
        base = sum(self.resident.values())
        totals = {moment: sum(terms.values()) + (0 if moment in self.alone else base)
                  for moment, terms in self.moments.items()}
        self.peak_moment = max(totals, key=totals.get)
        self.peak = totals[self.peak_moment]

    def fits(self, budget_bytes: float) -> bool:
        return self.peak <= budget_bytes

    def table(self) -> str:
        """The breakdown as text: every resident term, the terms of the peak moment, the total."""
        lines = [f"{'term':<46} {'GiB':>8}"]
        for term, size in ({} if self.peak_moment in self.alone else self.resident).items():
            lines.append(f"{term:<46} {size / GiB:>8.2f}")
        for term, size in self.moments[self.peak_moment].items():
            lines.append(f"{term + ' (' + self.peak_moment + ')':<46} {size / GiB:>8.2f}")
        lines.append(f"{'predicted peak (PyTorch allocated)':<46} {self.peak / GiB:>8.2f}   = {self.peak / GB:.1f} GB")
        return "\n".join(lines)


def _optimizer_state(shape: ModelShape, memory: OptimizerMemory, weight_bytes: int) -> int:
    # the Trainer registers embeddings for 32-bit bitsandbytes state (transformers' create_optimizer)
    full_precision = shape.small + shape.embedding
    large = shape.params - full_precision
    per_8bit = 1 + 4 / BNB_BLOCK  # the 8-bit moment and its share of a float32 scale
    if memory.state == "adam":
        return 2 * weight_bytes * shape.params
    if memory.state == "adam8":
        return int(2 * per_8bit * large) + 2 * 4 * full_precision
    if memory.state == "adam32":
        return 2 * 4 * shape.params
    if memory.state == "one":
        return weight_bytes * shape.params
    if memory.state == "one8":
        return int(per_8bit * large) + 4 * full_precision
    if memory.state == "one32":
        return 4 * shape.params
    if memory.state == "factored":
        return 4 * sum(rows + cols for rows, cols in shape.matrices) + 4 * (shape.params - sum(r * c for r, c in shape.matrices))
    return 0


def block_activation_bytes(shape: ModelShape, residual_bytes: int, compute_bytes: int, autocast_inputs: bool) -> int:
    """Bytes one decoder block saves for its backward pass, per token (see the module docstring).

    Args:
        residual_bytes: the residual stream's dtype size (the weights' under autocast).
        compute_bytes: the matmuls' dtype size.
        autocast_inputs: each linear layer casts its float32 input itself (q, k, v: three copies; gate, up: two).
    """
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    norms = 2 * (4 * h + residual_bytes * h)  # float32 input kept by the variance, normalized output
    linear_inputs = (3 + 2 if autocast_inputs else 1 + 1) * compute_bytes * h  # attention and MLP inputs
    attention = compute_bytes * (h + 2 * kv) + compute_bytes * h + 4 * shape.heads  # q, k, v, output (= o_proj input), lse
    mlp = 4 * compute_bytes * inter  # gate, up, act(gate), act(gate) * up (= down_proj input)
    return norms + linear_inputs + attention + mlp


def estimate(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Predict the peak memory of one process for ``setup`` (see the module docstring for the model)."""
    memory = optimizer_memory(setup.optim)
    n = setup.processes if setup.fsdp else 1
    weight_bytes = 4 if (setup.fsdp and setup.bf16) else DTYPE_BYTES[setup.dtype]
    autocast = setup.bf16 and not setup.fsdp
    compute_bytes = 2 if (setup.bf16 or weight_bytes == 2) else 4
    residual_bytes = compute_bytes if setup.fsdp else weight_bytes
    tokens = setup.micro_batch * setup.block_size

    resident = {
        "weights": shape.params * weight_bytes // n,
        "masks (bool, 1 byte per masked weight)": shape.masked // n,
        f"optimizer state ({setup.optim})": _optimizer_state(shape, memory, weight_bytes) // n,
    }
    if setup.fsdp and n > 1:
        resident["FSDP2 gathered blocks (running + prefetched)"] = 2 * shape.block_params * compute_bytes
    gradients = {"gradients": shape.params * weight_bytes // n}
    if setup.processes > 1 and not setup.fsdp:
        gradients["DDP gradient buckets"] = shape.params * weight_bytes

    per_block = block_activation_bytes(shape, residual_bytes, compute_bytes, autocast and weight_bytes == 4)
    head = tokens * ((4 + residual_bytes) * shape.hidden + compute_bytes * shape.hidden)  # final norm, output layer input
    loss = tokens * shape.vocab * (compute_bytes + 4 + 4 + 4)  # logits, float32 copy, log-softmax, its gradient
    forward = {}
    if setup.gradient_checkpointing:
        forward["activations (block inputs, checkpointed)"] = tokens * shape.layers * residual_bytes * shape.hidden
        forward["one block recomputed"] = tokens * per_block
    else:
        forward["activations"] = tokens * shape.layers * per_block
    forward["output layer and loss"] = head + loss
    if autocast and weight_bytes == 4:
        forward["autocast bf16 weight copies"] = 2 * shape.linear
    backward_end = dict(gradients)
    if setup.gradient_checkpointing:  # the first block's recomputation comes last, with every other gradient
        backward_end["one block recomputed"] = tokens * per_block
    step = dict(gradients)
    if memory.foreach_temporary:
        step["foreach step temporary"] = shape.params * weight_bytes // n
    moments = {"end of forward": forward, "end of backward": backward_end, "optimizer step": step}
    alone = ()
    if setup.fsdp and n > 1:  # each process loads the whole model and its masks before the Trainer shards them
        moments["before sharding"] = {"whole model, as loaded": shape.params * DTYPE_BYTES[setup.dtype],
                                      "whole masks": shape.masked}
        alone = ("before sharding",)
    return MemoryEstimate(shape, setup, resident, moments, alone)


# --------------------------------------------------------------------------- the dry run


def setup_from_args(model_args, data_args, recovery_args, training_args, bf16: bool | None = None) -> TrainingSetup:
    """The setup a ``prunetune recover`` command line would run on a CUDA GPU.

    ``--dtype auto`` means float32 master weights for ``full``. ``bf16``: None takes the parsed
    ``--bf16``, except on a machine without CUDA, where the parsed value says nothing about the
    GPU the run is for and the Trainer's GPU default (bf16 autocast) is assumed.
    """
    from prunetune.recover.sharding import fsdp_settings

    if bf16 is None:
        bf16 = bool(training_args.bf16) or (not torch.cuda.is_available() and not training_args.fp16)
    dtype = "float32" if model_args.dtype == "auto" else model_args.dtype
    processes = recovery_args.memory_estimate_processes or training_args.world_size
    return TrainingSetup(
        dtype=dtype, optim=str(getattr(training_args.optim, "value", training_args.optim)), bf16=bf16,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        micro_batch=training_args.per_device_train_batch_size, block_size=data_args.block_size or 1024,
        processes=processes, fsdp=fsdp_settings(training_args) is not None)


def report(model_args, data_args, recovery_args, training_args, bf16: bool | None = None) -> str:
    """The text ``--memory_estimate`` prints: the chosen setup's breakdown, then the alternatives.

    Args:
        bf16: the ``--bf16`` the command line gave explicitly (None: not given; see :func:`setup_from_args`).

    Raises:
        UsageError: a method other than ``full``, an unknown optimizer, a model without a readable shape.
    """
    if recovery_args.recovery_method != "full":
        raise UsageError(f"--memory_estimate predicts --recovery_method full; got {recovery_args.recovery_method}. "
                         "Add --recovery_method full (the adapter methods keep a frozen bf16 base and need far less).")
    processes, budget_gb = recovery_args.memory_estimate_processes, recovery_args.memory_estimate_budget_gb
    if processes is not None and not (isinstance(processes, int) and not isinstance(processes, bool) and processes > 0):
        raise UsageError(f"--memory_estimate_processes {processes!r} is not accepted: give the number of GPUs, 1 or more.")
    if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not 0 < budget_gb < float("inf"):
        raise UsageError(f"--memory_estimate_budget_gb {budget_gb!r} is not accepted: give the GPU's memory in GB, e.g. 80.")
    shape = model_shape(model_args.model_name_or_path, model_args.config_name, model_args.trust_remote_code)
    chosen = setup_from_args(model_args, data_args, recovery_args, training_args, bf16)
    result = estimate(shape, chosen)
    budget = recovery_args.memory_estimate_budget_gb * GB
    lines = [
        f"PREDICTED peak GPU memory (not a measurement) of prunetune recover --recovery_method full on {shape.name}",
        f"model shape: {shape.source}: {shape.params / 1e9:.2f}B parameters ({shape.masked / 1e9:.2f}B masked), "
        f"{shape.layers} blocks, hidden {shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}",
        f"setup: {chosen.label()}",
        "",
        result.table(),
        "",
        f"{'fits' if result.fits(budget) else 'does NOT fit'} a GPU of {recovery_args.memory_estimate_budget_gb:g} GB "
        f"(peak: {result.peak_moment}; the CUDA context, ~0.5-1 GiB, and allocator slack come on top).",
        "",
        "other setups, same model and batch:",
    ]
    alternatives = {
        "recommended: bf16 weights, 8-bit AdamW, checkpointing": TrainingSetup(
            dtype=RECOMMENDED["dtype"], optim=RECOMMENDED["optim"], bf16=True,
            gradient_checkpointing=RECOMMENDED["gradient_checkpointing"], micro_batch=chosen.micro_batch,
            block_size=chosen.block_size),
        "default: fp32 weights, bf16 autocast, fused AdamW": TrainingSetup(
            micro_batch=chosen.micro_batch, block_size=chosen.block_size),
        "fp32 weights, 8-bit AdamW, checkpointing": TrainingSetup(
            optim="adamw_bnb_8bit", gradient_checkpointing=True, micro_batch=chosen.micro_batch,
            block_size=chosen.block_size),
    }
    for label, setup in alternatives.items():
        other = estimate(shape, setup)
        lines.append(f"  {label:<55} {other.peak / GiB:>7.2f} GiB ({other.peak / GB:.1f} GB)"
                     f"{'' if other.fits(budget) else '  does not fit'}")
    if chosen.processes == 1:
        for n in (2, 4, 8):
            other = estimate(shape, TrainingSetup(micro_batch=chosen.micro_batch, block_size=chosen.block_size,
                                                  processes=n, fsdp=True))
            lines.append(f"  {'default under FSDP2, ' + str(n) + ' GPUs (per GPU)':<55} {other.peak / GiB:>7.2f} GiB "
                         f"({other.peak / GB:.1f} GB)")
    lines.append("measure it: python benchmarks/full_7b_memory.py (on a GPU)")
    return "\n".join(lines)


def announce(model_args, data_args, recovery_args, training_args) -> None:
    """The recipe's hook: refuse ``memory_estimate`` outside the command line; log the prediction of a CUDA ``full`` run.

    A prediction above the GPU's memory is a warning, before any weight is loaded; the run goes on
    (the prediction may be wrong, and the measured peak is in ``recovery.json``).

    Raises:
        UsageError: ``memory_estimate`` set on a call of :func:`prunetune.recover.recipe.recover`.
    """
    if recovery_args.memory_estimate:
        raise UsageError("memory_estimate is a dry run of the command line (prunetune recover ... --memory_estimate); "
                         "from Python call prunetune.recover.memory_estimate.report(model_args, data_args, "
                         "recovery_args, training_args) instead of recover().")
    if recovery_args.recovery_method != "full" or training_args.device.type != "cuda":
        return
    try:
        result = estimate(model_shape(model_args.model_name_or_path, model_args.config_name, model_args.trust_remote_code),
                          setup_from_args(model_args, data_args, recovery_args, training_args))
    except (UsageError, ValueError, KeyError, OSError) as err:  # an estimate never stops a run
        logger.debug("no memory prediction for %s: %s", model_args.model_name_or_path, err)
        return
    total = torch.cuda.get_device_properties(training_args.device).total_memory
    logger.info("predicted peak GPU memory %.2f GiB (%s; --memory_estimate shows the terms)", result.peak / GiB,
                result.setup.label())
    if result.peak > total:
        logger.warning("predicted peak GPU memory %.1f GiB is above this GPU's %.1f GiB: expect running out of memory. "
                       "--memory_estimate lists setups that fit (e.g. --dtype bfloat16 --optim adamw_bnb_8bit "
                       "--gradient_checkpointing, or FSDP2 over several GPUs).", result.peak / GiB, total / GiB)
