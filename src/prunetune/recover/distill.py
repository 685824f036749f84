"""Distillation from the dense model while a pruned model recovers (``--distill_from``).

The dense teacher runs beside the student on every training batch: frozen, in eval mode,
without gradients, never a submodule of the student (so nothing of it reaches a checkpoint,
an optimizer or DDP's gradient buckets; under DDP each rank loads its own). The loss is

    ce_weight * CE(student, next tokens)
  + kl_weight * T^2 * KL(teacher_T || student_T)          (next-token distributions at temperature T)
  + hidden_weight * mean over blocks of MSE(s_l, t_l) / Var(t_l)   (SquareHead, Kurtic et al. 2023)

averaged over the batch's predicted tokens. Evaluation (held-out perplexity) stays plain
cross-entropy.

Memory: the logits of a large vocabulary are the biggest tensors of a step (batch x seqlen x
vocab, twice: teacher and student). The student's forward is asked for the last position's
logits only (``logits_to_keep=1``); both models' final hidden states are then sent through
their output layers ``chunk_tokens`` positions at a time, each chunk under activation
checkpointing, so at most one chunk of logits per model exists at once, in the forward and
in the backward (about 7 chunk x vocab float32 tensors at the chunk's peak, hence the default of
256 positions: 0.9 GB for a 128k vocabulary). The chunks are computed inside the student's forward, in a
hook right after its output layer, and their graph leaves that forward through the logits it returns:
under FSDP2 the output layer's weights are gathered only there (and for a backward that starts from
the forward's outputs), so a loop after the forward would use sharded weights. Before the first step,
one short forward checks that the output layer applied to
the final hidden state reproduces the model's logits; a model that post-processes its logits (soft
capping, scaling) falls back to full logits, with a warning.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from prunetune.errors import UsageError
from prunetune.modules import find_decoder_blocks
# the teacher: checked before any work, loaded frozen, described for the results (re-exported from here)
from prunetune.recover.teacher import check_teacher, describe_teacher, load_teacher, model_bytes  # noqa: F401

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DistillSettings:
    """What ``--distill_*`` asked for (see :class:`prunetune.recipe.args.RecoveryArguments`)."""

    teacher: str
    ce_weight: float = 0.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 1.0
    chunk_tokens: int = 256
    dtype: str = "auto"

    @property
    def matches_hidden(self) -> bool:
        return self.hidden_weight > 0


# ---- capturing what the losses compare


def _plain(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Tap:
    """Forward hooks that keep a model's final hidden state and (optionally) each block's output."""

    def __init__(self, model: nn.Module, blocks: bool):
        plain = _plain(model)
        self.head = plain.get_output_embeddings()
        if self.head is None:
            raise UsageError(f"distillation needs a causal LM with an output layer; {type(plain).__name__} has none.")
        self.keeps_logits = "logits_to_keep" in inspect.signature(plain.forward).parameters
        self.final: torch.Tensor | None = None
        self.blocks: list[torch.Tensor] = []
        self.recording = False  # on only during the loss's forward (not a checkpointed block's recompute)
        self._handles = [plain.get_decoder().register_forward_hook(self._keep_final)]
        if blocks:
            self._handles += [block.module.register_forward_hook(self._keep_block) for block in find_decoder_blocks(plain)]

    def _keep_final(self, module, args, output):
        if not self.recording:
            return
        self.final = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _keep_block(self, module, args, output):
        if not self.recording:
            return
        self.blocks.append(output[0] if isinstance(output, tuple) else output)

    def clear(self, recording: bool = False) -> None:
        self.final, self.blocks, self.recording = None, [], recording

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- the losses


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row, in float32.

    Written as cross-entropy(student, teacher's probabilities) - entropy(teacher's probabilities):
    the teacher's side is formed without gradients and only its probabilities stay alive, and the
    fused soft-target cross-entropy keeps one log-softmax of the student for the backward, so a
    chunk holds fewer vocabulary-wide tensors than the textbook p * (log p - log q).
    """
    def scaled(logits: torch.Tensor) -> torch.Tensor:
        return logits.float() if temperature == 1 else logits.float() / temperature

    with torch.no_grad():
        teacher = F.log_softmax(scaled(teacher_logits), dim=-1)
        probs = teacher.exp()
        negative_entropy = (probs * teacher).sum(-1)
        del teacher
    cross = F.cross_entropy(scaled(student_logits), probs, reduction="none")
    return (cross + negative_entropy) * temperature**2


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, grad: bool) -> torch.Tensor:
    """Summed next-token CE; without a graph when its weight is 0 (then it is only logged)."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return F.cross_entropy(logits if grad else logits.detach(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _logit_losses(student_hidden, teacher_hidden, labels, student_head, teacher_head, temperature: float, want_kl: bool,
                  ce_grad: bool = True):
    """Summed CE and KL over rows (``labels == -100`` rows count in neither)."""
    logits = student_head(student_hidden).float()
    ce = _cross_entropy_sum(logits, labels, ce_grad)
    if not want_kl:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    kl = kl_per_token(logits, teacher_logits, temperature)
    return ce, (kl * (labels != IGNORE_INDEX)).sum()


def chunked_logit_losses(student_hidden, teacher_hidden, labels, student_head, teacher_head, temperature: float,
                         chunk_tokens: int, want_kl: bool = True, ce_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and KL over (N, hidden) rows, ``chunk_tokens`` rows at a time, each chunk checkpointed.

    Only one chunk's logits (student and teacher) exist at once: the backward recomputes each
    chunk's logits from its hidden rows. ``ce_grad=False``: the CE is computed for the log only.
    """
    ce_total, kl_total = student_hidden.new_zeros((), dtype=torch.float32), student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        pieces = (student_hidden[rows], teacher_hidden[rows] if teacher_hidden is not None else None, labels[rows])
        if torch.is_grad_enabled() and student_hidden.requires_grad and (want_kl or ce_grad):
            ce, kl = checkpoint(_logit_losses, *pieces, student_head, teacher_head, temperature, want_kl, ce_grad,
                                use_reentrant=False)
        else:
            ce, kl = _logit_losses(*pieces, student_head, teacher_head, temperature, want_kl, ce_grad)
        ce_total, kl_total = ce_total + ce, kl_total + kl
    return ce_total, kl_total


def squarehead(student_blocks: list[torch.Tensor], teacher_blocks: list[torch.Tensor],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of MSE(student, teacher) / Var(teacher), over the positions ``mask`` keeps."""
    if len(student_blocks) != len(teacher_blocks) or not student_blocks:
        raise RuntimeError(f"hidden-state matching saw {len(student_blocks)} student and {len(teacher_blocks)} teacher blocks")
    losses = []
    for student, teacher in zip(student_blocks, teacher_blocks):
        student, teacher = student.float(), teacher.float()
        if mask is not None:
            keep = mask.bool()
            student, teacher = student[keep], teacher[keep]
        losses.append(F.mse_loss(student, teacher) / teacher.var().clamp_min(1e-12))
    return torch.stack(losses).mean()


@dataclass
class LossParts:
    """One batch's loss (``total``, with its graph) and its parts, detached and still on the device:
    reading them as Python floats would make the host wait for the device on every micro-batch."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor


class Distiller:
    """Computes the distillation loss of one batch for a student (wrapped or not) and its teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, settings: DistillSettings):
        self.settings = settings
        self.teacher = teacher
        self.student_tap = Tap(student, settings.matches_hidden)
        self.teacher_tap = Tap(teacher, settings.matches_hidden)
        self.chunked = self.student_tap.keeps_logits  # confirmed (or not) before the first step
        self.checked = False

    def _teacher_pass(self, inputs: dict):
        """The teacher's forward; its full logits only when the losses cannot be chunked."""
        self.teacher_tap.clear(recording=True)
        keep_one = self.chunked and self.teacher_tap.keeps_logits
        with torch.no_grad():
            outputs = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                   **({"logits_to_keep": 1} if keep_one else {}))
        self.teacher_tap.recording = False
        return outputs

    def loss(self, model: nn.Module, inputs: dict) -> LossParts:
        settings = self.settings
        if not self.checked:
            self._check_head(model, inputs)
        teacher_outputs = self._teacher_pass(inputs)
        targets = inputs["labels"][:, 1:].reshape(-1)
        count = (targets != IGNORE_INDEX).sum().clamp_min(1)
        self.student_tap.clear(recording=True)
        if self.chunked:
            parts = {}
            with self._on_head(lambda head, output: self._chunk_losses(head, output, targets, count, parts)):
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=1)
            carried = outputs.logits.reshape(-1)[0]  # the logit losses' graph, through the model's output
            ce, kl = parts["ce"], parts["kl"]
            total = carried - carried.detach() + parts["total"].detach()
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
            ce_sum = _cross_entropy_sum(logits.float(), targets, settings.ce_weight > 0)
            kl_sum = ce_sum.new_zeros(())
            if settings.kl_weight > 0:  # the teacher's own logits: whatever its forward does after the output layer
                teacher_logits = teacher_outputs.logits[:, :-1].reshape(-1, teacher_outputs.logits.shape[-1])
                kl_sum = (kl_per_token(logits, teacher_logits, settings.temperature) * (targets != IGNORE_INDEX)).sum()
            ce, kl = ce_sum / count, kl_sum / count
            total = settings.ce_weight * ce + settings.kl_weight * kl
        self.student_tap.recording = False
        hidden = torch.zeros((), device=ce.device)
        if settings.matches_hidden:
            hidden = squarehead(self.student_tap.blocks, self.teacher_tap.blocks, inputs.get("attention_mask"))
            total = total + settings.hidden_weight * hidden
        self.student_tap.clear()
        self.teacher_tap.clear()
        return LossParts(total, ce.detach(), kl.detach(), hidden.detach())

    @contextlib.contextmanager
    def _on_head(self, compute):
        """Run ``compute(head, output)`` inside the student's forward, right after its output layer.

        The output layer's weights are only sure to be whole there: under FSDP2 the root module
        gathers them for its forward (and for its backward, which runs only for tensors that flow
        out of that forward). So the chunked losses are computed in this hook, and their graph
        leaves the forward through the logits it returns (:meth:`_chunk_losses`).
        """
        def once(module, args, output):
            handle.remove()  # before ``compute`` calls the output layer itself (and before a checkpoint's recompute)
            return compute(module, output)

        handle = self.student_tap.head.register_forward_hook(once, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def _chunk_losses(self, head: nn.Module, output: torch.Tensor, targets, count, parts: dict) -> torch.Tensor:
        """The chunked CE and KL; returns the head's output with the weighted sum's graph added (and 0 to its values)."""
        settings = self.settings
        student, teacher = self.student_tap.final, self.teacher_tap.final
        ce_sum, kl_sum = chunked_logit_losses(student[:, :-1].reshape(-1, student.shape[-1]),
                                              teacher[:, :-1].reshape(-1, teacher.shape[-1]), targets, head,
                                              self.teacher_tap.head, settings.temperature, settings.chunk_tokens,
                                              settings.kl_weight > 0, settings.ce_weight > 0)
        ce, kl = ce_sum / count, kl_sum / count
        total = settings.ce_weight * ce + settings.kl_weight * kl
        parts.update(ce=ce.detach(), kl=kl.detach(), total=total)
        return output.detach() + (total - total.detach()).to(output.dtype)  # the head's own logits get no gradient

    def _check_head(self, model: nn.Module, inputs: dict) -> None:
        """Before the first step: does the output layer on the final hidden state give the model's logits?

        One forward of the batch's first 64 positions of one sequence, without gradients.
        """
        self.checked = True
        if not self.chunked:
            return
        tokens = inputs["input_ids"][:1, :64]
        mask = inputs.get("attention_mask")
        rebuilt = []
        self.student_tap.clear(recording=True)
        with torch.no_grad(), self._on_head(lambda head, output: rebuilt.append(head(self.student_tap.final[0]).float())):
            reference = model(input_ids=tokens, attention_mask=None if mask is None else mask[:1, :64]).logits[0].float()
        self.student_tap.clear()
        if not torch.allclose(rebuilt[0], reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item()):
            logger.warning("distillation: this model's logits are not its output layer applied to its last hidden "
                           "state (logit scaling or capping); computing the losses from full logits instead of "
                           "chunks (more memory: batch x seqlen x vocab)")
            self.chunked = False

    def remove(self) -> None:
        self.student_tap.remove()
        self.teacher_tap.remove()


class DistillTrainer(Trainer):
    """A ``Trainer`` whose training loss is :class:`Distiller`'s; evaluation stays cross-entropy.

    The loss is a mean over each micro-batch's tokens, so the Trainer divides it by the
    gradient accumulation steps as it does for a model without loss kwargs.
    """

    def __init__(self, *args, distiller: Distiller, **kwargs):
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let the Trainer average over accumulation
        self._parts: dict = {"loss_ce": 0.0, "loss_kl": 0.0, "loss_hidden": 0.0}  # device tensors once a batch ran
        self._batches = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        parts = self.distiller.loss(model, inputs)
        self._parts["loss_ce"] += parts.ce
        self._parts["loss_kl"] += parts.kl
        self._parts["loss_hidden"] += parts.hidden
        self._batches += 1
        return (parts.total, None) if return_outputs else parts.total

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._batches:
            settings = self.distiller.settings
            means = {key: float(value) / self._batches for key, value in self._parts.items()}  # one sync per log
            logs["loss_ce"] = round(means["loss_ce"], 4)
            if settings.kl_weight > 0:
                logs["loss_kl"] = round(means["loss_kl"], 4)
            if settings.matches_hidden:
                logs["loss_hidden"] = round(means["loss_hidden"], 4)
            self._parts = dict.fromkeys(self._parts, 0.0)
            self._batches = 0
        super().log(logs, *args, **kwargs)
