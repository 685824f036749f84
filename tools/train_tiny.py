"""Train the bundled tiny model ("tiny"): a byte-level BPE tokenizer and a small Llama.

A maintainer script, not part of the installed package. Run from the repository root, with
prunetune installed (``pip install -e .``)::

    python tools/train_tiny.py --out src/prunetune/tiny

Everything is seeded and runs on CPU in well under half an hour on two cores. The script

1. trains a byte-level BPE tokenizer on the ``builtin`` corpus (train split) and saves it as
   a ``PreTrainedTokenizerFast`` that prepends ``<s>`` to every text;
2. trains a small ``LlamaForCausalLM`` (RMSNorm, RoPE, grouped-query attention, tied
   embeddings) on random ``seqlen`` windows of the tokenized train stream, with AdamW,
   linear warmup and cosine decay;
3. measures perplexity on the validation and test splits with the library's evaluator
   (:func:`prunetune.evaluate.perplexity`: non-overlapping windows), the perplexity of an
   add-one unigram model with the same tokenizer, and the test perplexity after the library's
   magnitude pruner removes 50% of every decoder linear layer;
4. writes ``model.safetensors``, ``config.json``, the tokenizer files, ``MODEL_CARD.md`` (from
   ``tiny_model_card.py``, next to this script) and ``train_log.json`` into ``--out``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # On a small shared CPU, OpenMP threads that spin while they wait lose most of their time to
    # other processes' threads: on 2 busy cores a step took 4x longer with the default (spinning)
    # policy than with passive waiting. The policy is read when torch loads its OpenMP runtime,
    # so it is set before torch is imported; an explicit OMP_WAIT_POLICY is respected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import math
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
EVAL_BATCH_SIZE = 8
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
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
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


def unigram_perplexity(train_stream: torch.Tensor, stream: torch.Tensor, seqlen: int, vocab_size: int) -> float:
    """Add-one-smoothed unigram model from ``train_stream``, scored on the tokens the LM predicts.

    Those are tokens 1..seqlen-1 of each non-overlapping ``seqlen`` window of ``stream`` (1, N),
    the remainder dropped: the windows :func:`prunetune.evaluate.perplexity` scores.
    """
    counts = torch.bincount(train_stream.reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    flat = stream.reshape(-1)
    windows = flat[: flat.numel() // seqlen * seqlen].view(-1, seqlen)  # (n, seqlen)
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())


def magnitude_pruned(model: nn.Module, sparsity: float = PRUNE_SPARSITY) -> nn.Module:
    """A copy of ``model`` with the library's magnitude pruner applied to every decoder linear layer."""
    from prunetune.pruning import PruneConfig, prune

    pruned = copy.deepcopy(model)
    prune(pruned, None, PruneConfig(method="magnitude", sparsity_ratio=sparsity))
    return pruned


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/train_tiny.py",
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
        f"python tools/train_tiny.py --out {args.out} --max_steps {args.max_steps} "
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
    from prunetune.evaluate import perplexity
    from prunetune.modules import prunable_layers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - wall_start:7.1f}s] {msg}", flush=True)

    # ---- data and tokenizer
    docs = {split: load_documents("builtin", split) for split in ("train", "validation", "test")}
    texts = {split: list(d.rows["text"]) for split, d in docs.items()}
    say("corpus: " + ", ".join(f"{s} {len(texts[s])} docs {d.fingerprint}" for s, d in docs.items()))
    tokenizer = train_tokenizer(texts["train"], args.vocab_size)
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
    n_linear = sum(m.weight.numel() for m in prunable_layers(model).values())
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
    validation = perplexity(model, streams["validation"], EVAL_SEQLEN, batch_size=EVAL_BATCH_SIZE)
    test = perplexity(model, streams["test"], EVAL_SEQLEN, batch_size=EVAL_BATCH_SIZE)
    val_ppl, test_ppl = validation.perplexity, test.perplexity
    uni_ppl = unigram_perplexity(train_stream, streams["test"], EVAL_SEQLEN, len(tokenizer))
    pruned = magnitude_pruned(model, PRUNE_SPARSITY)
    pruned_ppl = perplexity(pruned, streams["test"], EVAL_SEQLEN, batch_size=EVAL_BATCH_SIZE).perplexity
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
                s: {"documents": len(texts[s]), "tokens": int(streams[s].shape[1]), "fingerprint": d.fingerprint}
                for s, d in docs.items()
            },
        },
        "evaluation": {
            "seqlen": EVAL_SEQLEN,
            "validation_windows": validation.windows,
            "test_windows": test.windows,
            "validation_ppl": val_ppl,
            "test_ppl": test_ppl,
            "unigram_test_ppl": uni_ppl,
            "pruned50_test_ppl": pruned_ppl,
            "pruned_sparsity": PRUNE_SPARSITY,
            "pruned50_ratio": pruned_ppl / test_ppl,
            "unigram_ratio": uni_ppl / test_ppl,
        },
        "loss_every": LOG_EVERY,
        "losses": losses,
    }
    log["training"]["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    from tiny_model_card import write_model_card  # tools/, next to this script

    write_model_card(out, log)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.suffix != ".py"}
    say(f"saved to {out}: {sum(sizes.values()) / 1e6:.2f} MB {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
