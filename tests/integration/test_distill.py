"""Distillation from the dense model (--distill_from): the losses, the frozen teacher, exact sparsity, refusals."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from factories import make_model, make_tokenizer, prune_half_rows, random_tokens
from test_recover_cli import workspace  # noqa: F401  (module fixture: dense, pruned, text.txt)

from prunetune.cli import main
from prunetune.masks import measure_sparsity
from prunetune.modules import find_decoder_blocks
from prunetune.recover.distill import (
    Distiller,
    DistillSettings,
    chunked_logit_losses,
    kl_per_token,
    squarehead,
)



# ---- the losses against a direct computation


def _direct(student, teacher, tokens, temperature):
    """CE, KL and SquareHead computed the plain way: full logits, hidden states from a second capture."""
    last = {}
    hooks = [find_decoder_blocks(m)[-1].module.register_forward_hook(
        lambda module, args, out, key=key: last.__setitem__(key, out[0] if isinstance(out, tuple) else out))
        for key, m in (("student", student), ("teacher", teacher))]
    s = student(input_ids=tokens, labels=tokens, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(input_ids=tokens, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    sl, tl = s.logits[:, :-1].float(), t.logits[:, :-1].float()
    p_t = F.softmax(tl / temperature, -1)
    kl = (p_t * (F.log_softmax(tl / temperature, -1) - F.log_softmax(sl / temperature, -1))).sum(-1).mean() * temperature**2
    # hidden_states[1:-1]: the outputs of all blocks but the last (whose entry is after the final norm)
    s_blocks = [*s.hidden_states[1:-1], last["student"]]
    t_blocks = [*t.hidden_states[1:-1], last["teacher"]]
    sq = torch.stack([((a - b) ** 2).mean() / b.var() for a, b in zip(s_blocks, t_blocks)]).mean()
    return s.loss, kl, sq


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_loss_equals_a_direct_computation(arch, chunk):
    teacher = make_model(arch, seed=0)
    student = prune_half_rows(make_model(arch, seed=0))  # eval mode: no dropout, so two passes agree
    settings = DistillSettings(teacher="dense", ce_weight=0.7, kl_weight=1.3, hidden_weight=0.5, temperature=2.0,
                               chunk_tokens=chunk)
    distiller = Distiller(student, teacher, settings)
    tokens = random_tokens(3, 12)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    first = distiller.loss(student, batch)  # the first batch checks the output layer on full logits
    assert distiller.checked and distiller.chunked  # these models' logits are their output layer's: chunks from now on
    second = distiller.loss(student, batch)
    ce, kl, sq = _direct(student, teacher, tokens, 2.0)
    for parts in (first, second):
        assert float(parts.ce) == pytest.approx(ce.item(), rel=1e-5)
        # the KL is formed as H(teacher, student) - H(teacher), two values near log(vocab): float32 leaves ~1e-7 per nat
        assert float(parts.kl) == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
        assert float(parts.hidden) == pytest.approx(sq.item(), rel=1e-5)
        assert parts.total.item() == pytest.approx(0.7 * ce.item() + 1.3 * kl.item() + 0.5 * sq.item(), rel=1e-5)


def test_chunked_losses_and_gradients_equal_unchunked():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (23,))
    labels[[3, 11]] = -100  # ignored rows count in neither loss
    teacher_hidden = torch.randn(23, 16)
    results = []
    for chunk in (23, 4, 1):
        hidden = torch.randn(23, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        head_s.zero_grad()
        ce, kl = chunked_logit_losses(hidden, teacher_hidden, labels, head_s, head_t, 1.5, chunk)
        (ce + kl).backward()
        results.append((ce.detach(), kl.detach(), hidden.grad.clone(), head_s.weight.grad.clone()))
    logits = head_s(torch.randn(23, 16, generator=torch.Generator().manual_seed(1)))
    keep = labels != -100
    assert torch.allclose(results[0][0], F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
    assert torch.allclose(results[0][1], kl_per_token(logits, head_t(teacher_hidden), 1.5)[keep].sum())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert head_t.weight.grad is None  # the teacher's output layer never gets a gradient
    # the gradients equal those of the textbook CE + T^2 * sum p_t (log p_t - log p_s)
    hidden = torch.randn(23, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    head_s.zero_grad()
    student = F.log_softmax(head_s(hidden) / 1.5, -1)
    with torch.no_grad():
        teacher = F.log_softmax(head_t(teacher_hidden) / 1.5, -1)
    textbook = (teacher.exp() * (teacher - student)).sum(-1)[keep].sum() * 1.5**2
    (F.cross_entropy(head_s(hidden), labels, ignore_index=-100, reduction="sum") + textbook).backward()
    assert torch.allclose(results[0][1], textbook.detach(), rtol=1e-5)
    assert torch.allclose(results[0][2], hidden.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(results[0][3], head_s.weight.grad, rtol=1e-5, atol=1e-6)


def test_squarehead_is_scale_free_and_zero_at_the_teacher():
    teacher = [torch.randn(2, 5, 8) * 7 for _ in range(3)]
    assert squarehead(teacher, teacher).item() == 0.0
    noisy = [t + torch.randn_like(t) for t in teacher]
    scaled = squarehead([n * 10 for n in noisy], [t * 10 for t in teacher])
    assert scaled.item() == pytest.approx(squarehead(noisy, teacher).item(), rel=1e-5)



@pytest.mark.parametrize("chunk", [23, 4])
def test_a_zero_weight_cross_entropy_is_logged_but_has_no_graph(chunk):
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (23,))
    teacher_hidden = torch.randn(23, 16)
    grads = []
    for ce_grad in (True, False):
        hidden = torch.randn(23, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        ce, kl = chunked_logit_losses(hidden, teacher_hidden, labels, head_s, head_t, 1.0, chunk, ce_grad=ce_grad)
        assert ce.requires_grad == ce_grad
        assert torch.allclose(ce.detach(), F.cross_entropy(head_s(hidden), labels, reduction="sum"))
        kl.backward()
        grads.append(hidden.grad.clone())
    assert torch.allclose(grads[0], grads[1])  # the KL's gradient does not depend on whether the CE has a graph

def test_a_model_whose_logits_are_not_its_head_falls_back_to_full_logits(caplog):
    teacher, student = make_model("llama"), prune_half_rows(make_model("llama")).train()
    distiller = Distiller(student, teacher, DistillSettings(teacher="dense"))
    def scale(module, args, out):  # e.g. a logit scale or soft cap after the output layer
        out.logits = out.logits * 0.5
        return out

    handles = [student.register_forward_hook(scale), teacher.register_forward_hook(scale)]
    tokens = random_tokens(2, 10)
    batch = {"input_ids": tokens, "labels": tokens}
    try:
        parts = distiller.loss(student, batch)
        with torch.no_grad():  # the KL of the two models' own (scaled) logits, not of their output layers'
            s, t = student(input_ids=tokens).logits[:, :-1], teacher(input_ids=tokens).logits[:, :-1]
    finally:
        for handle in handles:
            handle.remove()
    assert not distiller.chunked and "full logits" in caplog.text
    assert float(parts.kl) == pytest.approx(kl_per_token(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), 1.0).mean().item(),
                                     rel=1e-5)


# ---- end to end through prunetune recover


def _args(ws, method, out, *extra):
    return ["recover", "--model_name_or_path", str(ws / "pruned"), "--dataset_name", str(ws / "text.txt"),
            "--block_size", "64", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--recovery_method", method, "--output_dir", str(out), "--save_strategy", "no", "--disable_tqdm", "true",
            "--distill_from", str(ws / "dense"), "--distill_hidden_weight", "1", "--max_steps", "4", *extra]


def _digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())).hexdigest()


def test_full_with_distillation_keeps_sparsity_and_a_frozen_unchanged_teacher(workspace, tmp_path, monkeypatch):  # noqa: F811
    from prunetune.recover import distill

    teachers = []
    real = distill.load_teacher

    def keep(settings, options, device):
        teacher = real(settings, options, device)
        teachers.append((teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
        return teacher

    monkeypatch.setattr(distill, "load_teacher", keep)
    before = _digest(workspace / "dense")
    out = tmp_path / "full"
    assert main(_args(workspace, "full", out, "--logging_steps", "1")) == 0
    (teacher, snapshot), = teachers
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert all(torch.equal(snapshot[k], v) for k, v in teacher.state_dict().items())  # bit-identical
    assert _digest(workspace / "dense") == before
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    pruned = AutoModelForCausalLM.from_pretrained(workspace / "pruned")
    assert measure_sparsity(trained).per_module() == measure_sparsity(pruned).per_module()
    for (name, a), b in zip(trained.named_parameters(), pruned.parameters()):
        if a.dim() == 2 and "layers" in name:
            assert torch.equal(a == 0, b == 0), name  # the same positions, exactly
    manifest = json.loads((out / "prunetune.json").read_text())
    assert manifest["distillation"]["hidden_weight"] == 1.0 and manifest["distillation"]["teacher_identity"]["bytes"] > 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all("loss_kl" in entry and "loss_hidden" in entry for entry in history if "loss" in entry)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["masks.safetensors", "model.safetensors"]  # student only


def test_masked_lora_with_distillation_merges_exactly(workspace, tmp_path):  # noqa: F811
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(_args(workspace, "masked_lora", out, "--distill_dtype", "bfloat16")) == 0
    assert json.loads((out / "prunetune.json").read_text())["distillation"]["teacher_identity"]["dtype"] == "bfloat16"
    assert main(["merge", "--model", str(workspace / "pruned"), "--adapter", str(out), "--save_model", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    pruned = measure_sparsity(AutoModelForCausalLM.from_pretrained(workspace / "pruned")).per_module()
    assert measure_sparsity(AutoModelForCausalLM.from_pretrained(merged)).per_module() == pruned


def test_resume_with_distillation_keeps_no_teacher_in_checkpoints(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "resumable"
    args = _args(workspace, "full", out, "--save_strategy", "steps", "--save_steps", "2")
    args[args.index("--max_steps") + 1] = "2"
    assert main(args) == 0
    checkpoint = out / "checkpoint-2"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    from transformers import AutoModelForCausalLM

    assert saved <= set(AutoModelForCausalLM.from_pretrained(workspace / "pruned").state_dict())
    args[args.index("--max_steps") + 1] = "4"
    assert main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("change, named", [
    ({"vocab_size": 96}, "vocabulary size is 96"),
    ({"num_hidden_layers": 3}, "number of blocks is 3"),
])
def test_a_mismatched_teacher_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch, change, named):  # noqa: F811
    from prunetune import loading

    config = make_model("llama").config
    for key, value in change.items():
        setattr(config, key, value)
    teacher = tmp_path / "teacher"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a))
    args = _args(workspace, "full", tmp_path / "out")
    args[args.index("--distill_from") + 1] = str(teacher)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err and str(teacher) in err and "Traceback" not in err
    assert not loads and not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_a_teacher_with_another_tokenizer_is_refused(workspace, tmp_path, capsys):  # noqa: F811
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    teacher = tmp_path / "teacher"
    make_model("llama").save_pretrained(teacher)
    vocab = {chr(65 + i % 26) + str(i): i for i in range(100)}  # same size range, other tokens
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
                            unk_token="A0").save_pretrained(teacher)
    args = _args(workspace, "masked_lora", tmp_path / "out")
    args[args.index("--distill_from") + 1] = str(teacher)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, named", [
    ("--distill_kl_weight", "-1", "--distill_kl_weight -1.0"),
    ("--distill_temperature", "0", "--distill_temperature 0.0"),
    ("--distill_chunk_tokens", "0", "--distill_chunk_tokens 0"),
    ("--distill_dtype", "int8", "--distill_dtype 'int8'"),
])
def test_bad_distill_flags_exit_2(workspace, tmp_path, capsys, flag, value, named):  # noqa: F811
    assert main([*_args(workspace, "full", tmp_path / "out"), flag, value]) == 2
    assert named in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_all_weights_zero_is_refused(workspace, tmp_path, capsys):  # noqa: F811
    args = [*_args(workspace, "full", tmp_path / "out"), "--distill_ce_weight", "0", "--distill_kl_weight", "0",
            "--distill_hidden_weight", "0"]
    assert main(args) == 2 and "nothing to train on" in capsys.readouterr().err


def test_accumulated_micro_batches_give_the_loss_of_one_batch(workspace, tmp_path):  # noqa: F811
    """batch 4 x 1 and batch 2 x 2 accumulation steps: the same logged loss (a mean, not a sum of means)."""
    losses = []
    for batch, accumulation in (("4", "1"), ("2", "2")):
        out = tmp_path / f"b{batch}"
        # KL only: a per-token mean, additive over micro-batches (SquareHead's variance is per batch)
        args = _args(workspace, "full", out, "--gradient_accumulation_steps", accumulation, "--distill_hidden_weight", "0")
        args[args.index("--per_device_train_batch_size") + 1] = batch
        args[args.index("--max_steps") + 1] = "1"
        assert main(args) == 0
        losses.append(json.loads((out / "recovery.json").read_text())["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# ---- teachers that teach nothing useful: the student itself, another pruned model


@pytest.mark.parametrize("where", ["same folder", "copy"])
def test_the_student_itself_is_refused_as_its_teacher(workspace, tmp_path, capsys, monkeypatch, where):  # noqa: F811
    """Its losses would start at about 0 and nothing would be learned, with exit 0: refused before any work."""
    import shutil

    from prunetune import loading

    teacher = workspace / "pruned"
    if where == "copy":  # another folder, the same weight files
        teacher = tmp_path / "copy"
        shutil.copytree(workspace / "pruned", teacher)
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a))
    args = _args(workspace, "masked_lora", tmp_path / "out")
    args[args.index("--distill_from") + 1] = str(teacher)
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps long messages
    assert "is the student itself" in err and str(teacher) in err and "Traceback" not in err
    assert ("same weights" in err) == (where == "copy")
    assert not loads and not (tmp_path / "out").exists()


def test_a_pruned_teacher_is_warned_about_and_its_sparsity_described(workspace, tmp_path, caplog):  # noqa: F811
    from prunetune.loading import LoadOptions
    from prunetune.recover.distill import check_teacher, describe_teacher, load_teacher

    teacher = tmp_path / "other_pruned"  # pruned, but not the student: allowed, loudly
    prune_half_rows(make_model("llama", seed=1)).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    described = {}
    for name, folder in (("pruned", teacher), ("dense", workspace / "dense")):
        settings = DistillSettings(teacher=str(folder), ce_weight=0.5, kl_weight=1.0, hidden_weight=0.0, temperature=2.0)
        check_teacher(settings.teacher, str(workspace / "pruned"), settings, LoadOptions(), make_tokenizer())
        caplog.clear()
        with caplog.at_level("WARNING", logger="prunetune"):
            model = load_teacher(settings, LoadOptions(), "cpu")
        warned = [r.getMessage() for r in caplog.records if "is itself pruned" in r.getMessage()]
        assert len(warned) == (name == "pruned") and all("50.0%" in w and str(folder) in w for w in warned)
        described[name] = describe_teacher(settings, model)
    files = sorted(teacher.glob("*.safetensors"))
    expected = hashlib.sha256(b"".join(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode()
                                       for f in files)).hexdigest()
    assert described["pruned"] == {
        "teacher": str(teacher), "path": str(teacher.resolve()), "weights_sha256": expected, "sparsity": 0.5,
        "pruned": True, "dtype": "float32", "bytes": described["pruned"]["bytes"],
        "loss_weights": {"ce": 0.5, "kl": 1.0, "hidden": 0.0}, "temperature": 2.0}
    assert described["dense"]["sparsity"] == 0.0 and not described["dense"]["pruned"]
    assert described["dense"]["weights_sha256"] != expected
