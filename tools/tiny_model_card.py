"""The bundled tiny model's ``MODEL_CARD.md``, written from its ``train_log.json`` (see ``train_tiny.py``)."""

from __future__ import annotations

from pathlib import Path


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
| optimizer | AdamW (betas 0.9/0.95, weight decay {tr['weight_decay']} on matrices), grad clip {tr['grad_clip']} |
| learning rate | {tr['lr']} peak, {round(tr['warmup_fraction'] * 100)}% linear warmup, cosine decay to {tr['min_lr_fraction']} x peak |
| seed | {tr['seed']} |
| threads | {tr['threads']} |
| final train loss | {tr['final_loss']:.4f} (mean of the last {log['loss_every']} steps) |
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
joined split stream (`prunetune.data.tokenize_stream`), remainder dropped
(`prunetune.evaluate.perplexity`).

| | perplexity |
|---|---|
| validation | {_fmt(ev['validation_ppl'])} ({ev['validation_windows']} windows) |
| test | {_fmt(ev['test_ppl'])} ({ev['test_windows']} windows) |
| unigram baseline (test) | {_fmt(ev['unigram_test_ppl'])} |
| test, 50% magnitude-pruned | {_fmt(ev['pruned50_test_ppl'])} |

The unigram baseline uses the same tokenizer: token frequencies of the train stream with add-one
smoothing, scored on the same test tokens the model predicts. The pruned row zeroes, separately
in each `nn.Linear` of the decoder layers, the {round(ev.get('pruned_sparsity', 0.5) * 100)}% smallest-magnitude
weights (prunetune's `magnitude` pruner; no calibration, no recovery; embeddings and norms
untouched) -- a reference point for the pruning methods prunetune implements.
"""
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")
