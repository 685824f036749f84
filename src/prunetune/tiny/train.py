"""Train the bundled tiny model ("tiny"): a byte-level BPE tokenizer and a small Llama.

Run from the repository root::

    PYTHONPATH=src python -m prunetune.tiny.train --out src/prunetune/tiny

Everything is seeded and runs on CPU in well under half an hour on two cores. The script

1. trains a byte-level BPE tokenizer on the ``builtin`` corpus (train split) and saves it as
   a ``PreTrainedTokenizerFast`` that prepends ``<s>`` to every text;
2. trains a small ``LlamaForCausalLM`` (RMSNorm, RoPE, grouped-query attention, tied
   embeddings) on random ``seqlen`` windows of the tokenized train stream, with AdamW,
   linear warmup and cosine decay;
3. measures perplexity on the validation and test splits (non-overlapping windows), the
   perplexity of an add-one unigram model with the same tokenizer, and the test perplexity
   after zeroing the 50% smallest-magnitude weights of every decoder linear layer;
4. writes ``model.safetensors``, ``config.json``, the tokenizer files, ``MODEL_CARD.md`` and
   ``train_log.json`` into ``--out``.

The evaluation helpers (:func:`window_perplexity`, :func:`unigram_perplexity`,
:func:`magnitude_prune_decoder_`) are importable so tests can recompute the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

# --------------------------------------------------------------------------- shipped settings

VOCAB_SIZE = 4096
HIDDEN = 128
LAYERS = 4
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 344  # ~8/3 x hidden, a multiple of 8 (down_proj's in_features)
MAX_POSITIONS = 512
ROPE_THETA = 10000.0

DEFAULT_MAX_STEPS = 1800
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQLEN = 256
DEFAULT_LR = 2e-3
DEFAULT_SEED = 0
DEFAULT_THREADS = 2
DEFAULT_OUT = "src/prunetune/tiny"
DEFAULT_TIME_LIMIT_MINUTES = 28.0
# Time kept for evaluation + saving when the time limit plans training: the evaluation runs
# ~500k tokens forward (validation, test, pruned test), about 100 training steps' worth of
# compute, so the reserve scales with the measured step time (~40 s on 2 idle cores).
EVAL_RESERVE_STEPS = 100
EVAL_RESERVE_MIN_SECONDS = 90.0
COOLDOWN_FRACTION = 0.1  # a time-limited run anneals over (at most) this share of max_steps
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
LOG_EVERY = 10
EVAL_SEQLEN = 256
PRUNE_SPARSITY = 0.5

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ARTIFACTS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "MODEL_CARD.md",
    "train_log.json",
)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; adds ``<s>`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- model


def build_config(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )


def lr_at(step: int, max_steps: int, peak: float) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``MIN_LR_FRACTION * peak``."""
    warmup = max(1, int(round(WARMUP_FRACTION * max_steps)))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * cosine)


class Schedule:
    """:func:`lr_at`, which the time limit may shorten mid-run.

    A shortening at step ``s`` to ``total`` steps (done once the time left only holds a
    cool-down of about ``COOLDOWN_FRACTION * max_steps`` steps) decays the learning rate by a cosine from its
    value at ``s`` to the floor at ``total``, so a cut-short run still ends annealed.
    """

    def __init__(self, max_steps: int, peak: float):
        self.max_steps = max_steps
        self.total = max_steps
        self.peak = peak
        self.anchor: tuple[int, float] | None = None
        self.shortenings: list[tuple[int, int]] = []

    def lr(self, step: int) -> float:
        if self.anchor is None:
            return lr_at(step, self.max_steps, self.peak)
        start, start_lr = self.anchor
        floor = MIN_LR_FRACTION * self.peak
        progress = min(1.0, (step - start) / max(1, self.total - start))
        return floor + (start_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def shorten(self, step: int, total: int) -> None:
        self.anchor = (step, max(self.lr(step), MIN_LR_FRACTION * self.peak))
        self.total = total
        self.shortenings.append((step, total))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # matrices decay; norms (1-D) and the (tied) embedding do not
        (decay if param.ndim == 2 and "embed" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------- evaluation


def eval_windows(stream: torch.Tensor, seqlen: int = EVAL_SEQLEN, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of a (1, N) stream, shape (n, seqlen); remainder dropped."""
    flat = stream.reshape(-1)
    n = flat.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return flat[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def window_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1, :].float()
        targets = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def unigram_perplexity(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Add-one-smoothed unigram model from ``train_stream``, scored on the tokens the LM predicts."""
    counts = torch.bincount(train_stream.reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())


def decoder_linears(model: nn.Module):
    """(name, module) for every ``nn.Linear`` inside the decoder layers (not lm_head)."""
    layers = model.model.layers
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                yield f"model.layers.{index}.{name}", module


@torch.no_grad()
def magnitude_prune_decoder_(model: nn.Module, sparsity: float = PRUNE_SPARSITY) -> nn.Module:
    """Zero the ``sparsity`` fraction of smallest-|w| weights of each decoder linear, in place."""
    for _, module in decoder_linears(model):
        weight = module.weight
        k = int(weight.numel() * sparsity)
        if k == 0:
            continue
        threshold = weight.abs().flatten().kthvalue(k).values
        weight.masked_fill_(weight.abs() <= threshold, 0.0)
    return model


# --------------------------------------------------------------------------- card


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x < 1000 else f"{x:.1f}"


def write_model_card(out: Path, log: dict) -> None:
    cfg, tr, ev, fp = log["config"], log["training"], log["evaluation"], log["corpus"]
    steps = str(tr["steps_done"])
    if tr["steps_done"] != tr["max_steps"]:
        steps += (
            f" (of {tr['max_steps']} asked: the time limit shortened the schedule, re-annealing "
            f"from the current learning rate, at step(s) {[a for a, _ in tr['schedule_shortened_by_time_limit']]})"
        )
    text = f"""# prunetune tiny model

A small Llama-architecture causal language model bundled with prunetune so that every
command, test and tutorial can run offline on a CPU (`--model tiny`). It was trained from
scratch on the `builtin` corpus: the Python standard-library sources of the interpreter
(tests and site-packages excluded, split by a hash of each file's path). It writes
Python-looking code and nothing else; it is a test fixture, not a useful language model.

## Architecture

| | |
|---|---|
| model type | `llama` (`LlamaForCausalLM`): RMSNorm, RoPE, SwiGLU MLP |
| hidden size | {cfg['hidden_size']} |
| layers | {cfg['num_hidden_layers']} |
| attention heads | {cfg['num_attention_heads']} (head dim {cfg['hidden_size'] // cfg['num_attention_heads']}) |
| key/value heads | {cfg['num_key_value_heads']} (grouped-query attention) |
| intermediate size | {cfg['intermediate_size']} |
| vocabulary | {cfg['vocab_size']} (byte-level BPE trained on the builtin train split) |
| max positions | {cfg['max_position_embeddings']} |
| tied embeddings | {cfg['tie_word_embeddings']} |
| parameters | {log['parameters']:,} ({log['decoder_linear_parameters']:,} in decoder linear layers) |
| weights dtype | {log['dtype']} |

Every linear layer's `in_features` is a multiple of 8, so 2:4 and 4:8 semi-structured pruning
applies to all of them. Tokenizer: special tokens `<s>` (bos, id {log['tokenizer']['bos_token_id']}),
`</s>` (eos, id {log['tokenizer']['eos_token_id']}, also pad), `<unk>`; `<s>` is prepended to every text.

## Training

Command (run from the repository root):

```
{tr['command']}
```

| | |
|---|---|
| steps | {steps} |
| batch size | {tr['batch_size']} windows |
| sequence length | {tr['seqlen']} |
| tokens seen | {tr['tokens_seen']:,} |
| train stream | {tr['train_tokens']:,} tokens |
| optimizer | AdamW (betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices), grad clip {GRAD_CLIP} |
| learning rate | {tr['lr']} peak, {int(WARMUP_FRACTION * 100)}% linear warmup, cosine decay to {MIN_LR_FRACTION} x peak |
| seed | {tr['seed']} |
| threads | {tr['threads']} |
| final train loss | {tr['final_loss']:.4f} (mean of the last {LOG_EVERY} steps) |
| training time | {tr['train_seconds']:.0f} s |
| total wall time | {tr['wall_seconds']:.0f} s (tokenizer, training, evaluation, saving) |
| machine | {tr['machine']} |
| CPU load while training | {tr['mean_load_average']} (mean 1-minute load average during training; above the core count means other jobs shared the CPU) |
| Python version | {fp['python_version']} |
| torch / transformers / tokenizers | {tr['versions']} |

The builtin corpus is whatever standard library the running Python ships, so its contents (and
these fingerprints) depend on the Python version:

| split | documents | tokens | fingerprint |
|---|---|---|---|
| train | {fp['train']['documents']} | {fp['train']['tokens']:,} | `{fp['train']['fingerprint']}` |
| validation | {fp['validation']['documents']} | {fp['validation']['tokens']:,} | `{fp['validation']['fingerprint']}` |
| test | {fp['test']['documents']} | {fp['test']['tokens']:,} | `{fp['test']['fingerprint']}` |

Train corpus fingerprint: `{fp['train']['fingerprint']}`

## Evaluation

Perplexity = exp(mean next-token NLL) over non-overlapping windows of {ev['seqlen']} tokens of the
joined split stream (`prunetune.data.tokenize_stream`), remainder dropped.

| | perplexity |
|---|---|
| validation | {_fmt(ev['validation_ppl'])} ({ev['validation_windows']} windows) |
| test | {_fmt(ev['test_ppl'])} ({ev['test_windows']} windows) |
| unigram baseline (test) | {_fmt(ev['unigram_test_ppl'])} |
| test, 50% magnitude-pruned | {_fmt(ev['pruned50_test_ppl'])} |

The unigram baseline uses the same tokenizer: token frequencies of the train stream with add-one
smoothing, scored on the same test tokens the model predicts. The pruned row zeroes, separately
in each `nn.Linear` of the decoder layers, the {int(PRUNE_SPARSITY * 100)}% smallest-magnitude
weights (no calibration, no recovery; embeddings and norms untouched) -- a reference point for
the pruning methods prunetune implements.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prunetune.tiny.train",
        description="Train the bundled tiny Llama model and its tokenizer on the builtin corpus.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--max_steps", type=int, default=DEFAULT_MAX_STEPS, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="windows per step (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="training window length (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--time_limit_minutes",
        type=float,
        default=DEFAULT_TIME_LIMIT_MINUTES,
        help="safety valve for a busy CPU: if the whole run would pass this many minutes of wall "
        "time, shorten the learning-rate schedule (re-annealing from the current rate) so it ends "
        "in time, and say so in the card; 0 disables (default: %(default)s)",
    )
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE, help="BPE vocabulary size (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--max_steps, --batch_size and --threads must be positive")
    if not 2 <= args.seqlen <= MAX_POSITIONS:
        parser.error(f"--seqlen must be between 2 and {MAX_POSITIONS}")
    if not 300 <= args.vocab_size <= 8192:
        parser.error("--vocab_size must be between 300 and 8192")
    return args


def _command(args: argparse.Namespace) -> str:
    return (
        f"PYTHONPATH=src python -m prunetune.tiny.train --out {args.out} --max_steps {args.max_steps} "
        f"--batch_size {args.batch_size} --seqlen {args.seqlen} --lr {args.lr} --seed {args.seed} "
        f"--threads {args.threads}"
        + (f" --vocab_size {args.vocab_size}" if args.vocab_size != VOCAB_SIZE else "")
        + (f" --time_limit_minutes {args.time_limit_minutes}" if args.time_limit_minutes != DEFAULT_TIME_LIMIT_MINUTES else "")
    )


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {threads} torch threads "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
        f"{platform.system()} {platform.release()}, no GPU"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import tokenizers
    import transformers
    from transformers import LlamaForCausalLM

    from prunetune.data import load_documents, tokenize_stream

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - wall_start:7.1f}s] {msg}", flush=True)

    # ---- data and tokenizer
    docs = {split: load_documents("builtin", split) for split in ("train", "validation", "test")}
    say("corpus: " + ", ".join(f"{s} {len(d.texts)} docs {d.fingerprint}" for s, d in docs.items()))
    tokenizer = train_tokenizer(docs["train"].texts, args.vocab_size)
    tokenizer.name_or_path = str(out)
    streams = {split: tokenize_stream(tokenizer, d) for split, d in docs.items()}
    say("tokenizer: vocab %d; tokens %s" % (len(tokenizer), {s: t.shape[1] for s, t in streams.items()}))
    train_stream = streams["train"].reshape(-1)
    if train_stream.numel() <= args.seqlen + 1:
        raise SystemExit("the train stream is shorter than one window")

    # ---- model
    config = build_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for _, m in decoder_linears(model))
    say(f"model: {n_params:,} parameters ({n_linear:,} in decoder linears)")

    # ---- training
    optimizer = make_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    high = train_stream.numel() - args.seqlen
    losses, recent = [], []
    model.train()
    train_start = time.perf_counter()
    schedule = Schedule(args.max_steps, args.lr)
    limit_at = wall_start + args.time_limit_minutes * 60.0
    step_times: list[float] = []
    step, lr = 0, 0.0
    load_samples: list[float] = []
    while step < schedule.total:
        if args.time_limit_minutes > 0 and len(step_times) >= 20 and step % LOG_EVERY == 0:
            # Act only near the end, so a burst of contention early on costs nothing: once the
            # time left shrinks to a cool-down's worth of steps and the schedule cannot finish,
            # anneal over the steps that still fit.
            per_step = sum(step_times[-50:]) / len(step_times[-50:])
            deadline = limit_at - max(EVAL_RESERVE_MIN_SECONDS, EVAL_RESERVE_STEPS * per_step)
            affordable = int((deadline - time.perf_counter()) / per_step * 0.95)
            cooldown = max(LOG_EVERY, int(COOLDOWN_FRACTION * schedule.max_steps))
            if step + affordable < schedule.total and affordable <= cooldown:
                new_total = max(step + 1, step + affordable)
                say(f"time limit: shortening the schedule from {schedule.total} to {new_total} steps "
                    f"({per_step:.2f} s/step now)")
                schedule.shorten(step, new_total)
        step_start = time.perf_counter()
        lr = schedule.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, high, (args.batch_size,), generator=generator)
        batch = torch.stack([train_stream[s : s + args.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        recent.append(loss.item())
        step += 1
        step_times.append(time.perf_counter() - step_start)
        if step % LOG_EVERY == 0 or step == schedule.total:
            mean = sum(recent) / len(recent)
            elapsed = time.perf_counter() - train_start
            losses.append({"step": step, "loss": round(mean, 5), "lr": lr, "seconds": round(elapsed, 1)})
            recent = []
            if hasattr(os, "getloadavg"):
                load_samples.append(round(os.getloadavg()[0], 2))
            if step % (LOG_EVERY * 10) == 0 or step == schedule.total or step == LOG_EVERY:
                say(f"step {step}/{schedule.total} loss {mean:.4f} lr {lr:.2e} ({step / elapsed:.2f} steps/s)")
    steps_done = step
    train_seconds = time.perf_counter() - train_start
    model.eval()

    # ---- evaluation
    windows = {s: eval_windows(streams[s], EVAL_SEQLEN) for s in ("validation", "test")}
    val_ppl = window_perplexity(model, windows["validation"])
    test_ppl = window_perplexity(model, windows["test"])
    uni_ppl = unigram_perplexity(train_stream, windows["test"], len(tokenizer))
    pruned = magnitude_prune_decoder_(copy.deepcopy(model), PRUNE_SPARSITY)
    pruned_ppl = window_perplexity(pruned, windows["test"])
    del pruned
    say(f"ppl: validation {val_ppl:.3f} test {test_ppl:.3f} unigram {uni_ppl:.1f} pruned50 {pruned_ppl:.3f}")

    # ---- save
    for name in ARTIFACTS:  # no stale files from an earlier run
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for extra in ("chat_template.jinja",):
        (out / extra).unlink(missing_ok=True)

    log = {
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings",
            )
        },
        "parameters": n_params,
        "decoder_linear_parameters": n_linear,
        "dtype": "float32",
        "tokenizer": {
            "type": "byte-level BPE",
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "training": {
            "command": _command(args),
            "max_steps": args.max_steps,
            "steps_done": steps_done,
            "schedule_shortened_by_time_limit": schedule.shortenings,
            "batch_size": args.batch_size,
            "seqlen": args.seqlen,
            "tokens_seen": steps_done * args.batch_size * args.seqlen,
            "train_tokens": int(train_stream.numel()),
            "lr": args.lr,
            "warmup_fraction": WARMUP_FRACTION,
            "min_lr_fraction": MIN_LR_FRACTION,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "seed": args.seed,
            "threads": args.threads,
            "final_loss": losses[-1]["loss"],
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": None,  # filled below
            "machine": _machine(args.threads),
            "mean_load_average": round(sum(load_samples) / len(load_samples), 2) if load_samples else None,
            "versions": f"{torch.__version__} / {transformers.__version__} / {tokenizers.__version__}",
        },
        "corpus": {
            "source": "builtin",
            "python_version": platform.python_version(),
            **{
                s: {"documents": len(d.texts), "tokens": int(streams[s].shape[1]), "fingerprint": d.fingerprint}
                for s, d in docs.items()
            },
        },
        "evaluation": {
            "seqlen": EVAL_SEQLEN,
            "validation_windows": int(windows["validation"].shape[0]),
            "test_windows": int(windows["test"].shape[0]),
            "validation_ppl": val_ppl,
            "test_ppl": test_ppl,
            "unigram_test_ppl": uni_ppl,
            "pruned50_test_ppl": pruned_ppl,
            "pruned50_ratio": pruned_ppl / test_ppl,
            "unigram_ratio": uni_ppl / test_ppl,
        },
        "loss_every": LOG_EVERY,
        "losses": losses,
    }
    log["training"]["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    write_model_card(out, log)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.suffix != ".py"}
    say(f"saved to {out}: {sum(sizes.values()) / 1e6:.2f} MB {sizes}")
    return 0


def _reexec_with_passive_omp() -> None:
    """Run this command again, once, with ``OMP_WAIT_POLICY=PASSIVE``.

    On a small shared CPU, OpenMP threads that spin while they wait lose most of their time to
    other processes' threads: on 2 busy cores a step took 4x longer with the default (spinning)
    policy than with passive waiting. The policy is read when torch loads its OpenMP runtime,
    which ``prunetune/__init__`` has already done by now, hence the re-exec. An explicit
    ``OMP_WAIT_POLICY`` in the environment is respected.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_passive_omp()
    sys.exit(main())
