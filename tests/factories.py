"""Tiny random models built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128


def config_for(arch: str, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, word_embed_proj_dim=hidden, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=hidden, intermediate_size=intermediate, max_position_embeddings=256,
                               bos_token_id=1, eos_token_id=2, **common)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt_neox", "gpt2")


def make_model(arch: str = "llama", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config_for(arch, **kwargs))
    model.eval()
    return model


def random_tokens(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=generator)


def make_tokenizer():
    """A character-level tokenizer whose ids fit VOCAB: <unk>=0, <s>=1, </s>=2, then \\t, \\n and printable ASCII."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(chars)})
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def save_model_folder(path, arch: str = "llama", seed: int = 0):
    """A random model + character tokenizer saved as a Hugging Face folder; returns the model."""
    model = make_model(arch, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return model


def prune_half_rows(model):
    """Zero the smaller-magnitude half of every row of every prunable layer (a 50% pruned model); returns it."""
    from prunetune.modules import prunable_layers, weight_matrix

    with torch.no_grad():
        for module in prunable_layers(model).values():
            weight = weight_matrix(module)
            weight.scatter_(1, weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2], 0.0)
    return model


class lock_held_elsewhere:
    """Another process holding prunetune's lock on ``path`` (as a second run would); ``pid`` is its id."""

    def __init__(self, path, command: str):
        self.path, self.command = str(path), command

    def __enter__(self):
        import subprocess
        import sys
        import textwrap

        self.process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import time
            from prunetune.outputs import output_lock
            with output_lock({self.path!r}, {self.command!r}):
                print("locked", flush=True)
                time.sleep(60)
            """)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


class Killed(Exception):
    """What KillAfterSave raises: the process 'died'."""


def kill_after_save(step: int):
    """A TrainerCallback that dies right after the checkpoint of ``step`` is on disk, like a preempted job."""
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Killed()

    return KillAfterSave()
