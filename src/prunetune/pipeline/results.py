"""Stage results -> the report's plain data: one table row per configuration (with its zero-shot scores when the
config names lm-eval tasks), each prune entry's sparsity profile, curves, per-layer errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from prunetune.pipeline.config import PruneSpec
from prunetune.pipeline.plan import RecoveryStep
from prunetune.report import RecoveryCurve, ReportData, ResultRow

logger = logging.getLogger(__name__)


def prune_profile(spec: PruneSpec, summary: dict) -> dict:
    """What the report plots and tables need of one prune entry's sparsity profile.

    ``method``: the pruner with what else sets the entry apart (variant, true sequential, reconstructed), so
    entries of one method at several ratios form one series; ``target``: the sparsity ratio (None for N:M);
    ``profile``: ``uniform``, ``owl`` or the profile file's name; ``sparsity_profile``: the prune report's dict
    (kind, target, block_ratios, layer_ratios, owl); a stage finished before profiles existed was uniform.
    """
    profile = summary.get("sparsity_profile") or {"kind": "uniform"}
    kind = profile.get("kind", "uniform")
    name = Path(profile["source"]).name if kind not in ("uniform", "owl") and profile.get("source") else kind
    return {"method": spec.series(), "target": spec.target(), "profile": name, "sparsity": summary["sparsity"]["overall"],
            "sparsity_profile": profile}


class ReportCollector:
    """Gathers what the stages returned into a :class:`prunetune.report.ReportData`."""

    def __init__(self, title: str):
        self.data = ReportData(title=title)

    @property
    def rows(self) -> list[ResultRow]:
        return self.data.rows

    def add_dense(self, result: dict) -> None:
        self.rows.append(ResultRow("dense", "dense", "-", perplexity=result["evaluation"]["perplexity"],
                                   sparsity=result["sparsity"]["overall"], zeroshot=result["evaluation"].get("zeroshot")))

    def add_pruned(self, spec: PruneSpec, result: dict) -> None:
        self.rows.append(ResultRow(spec.label(), "prune", spec.method, spec.sparsity_type,
                                   perplexity=result["evaluation"]["perplexity"], sparsity=result["prune"]["sparsity"]["overall"],
                                   seconds=result["prune"]["seconds"], peak_memory_mb=result["peak_memory_mb"],
                                   peak_memory_kind=result["peak_memory_kind"],
                                   zeroshot=result["evaluation"].get("zeroshot")))
        self.data.profiles[spec.label()] = prune_profile(spec, result["prune"])

    def gap_won_back(self, pruned: str, perplexity: float) -> float | None:
        """The share of the dense-to-pruned perplexity gap a recovery closed, against the prune entry ``pruned``."""
        by_name = {row.name: row for row in self.rows}
        dense = next((row.perplexity for row in self.rows if row.stage == "dense"), math.nan)
        gap = by_name[pruned].perplexity - dense if pruned in by_name else math.nan
        if not (math.isfinite(gap) and gap > 0 and math.isfinite(perplexity)):
            return None
        return (by_name[pruned].perplexity - perplexity) / gap

    def add_recovered(self, step: RecoveryStep, structure: str, result: dict, pruned_sparsity: float) -> str:
        """The row(s) of one recovery stage and its curves; returns the configuration's name.

        ``pruned_sparsity``: that of the prune entry at the root of the stack; a model-folder recovery
        (full, blockwise, masked_lora merged) that does not keep it gets a note saying so.
        """
        name, method = step.label, step.method
        note = result.get("dtype_note", "")
        gap = self.gap_won_back(step.prune, result["evaluation"]["perplexity"])
        if (step.base is not None or method == "blockwise") and gap is not None:  # stacks: how far each step got
            note = f"{gap:.1%} of the {step.prune} gap to dense won back" + (f"; {note}" if note else "")
        if method != "lora" and abs(result["sparsity"] - pruned_sparsity) > 1e-9:
            logger.warning("%s: sparsity %.6f differs from the pruned model's %.6f", name, result["sparsity"], pruned_sparsity)
            note = (f"sparsity {result['sparsity']:.4%} differs from the pruned model's {pruned_sparsity:.4%}"
                    + (f"; {note}" if note else ""))
        if result.get("distillation"):
            d = result["distillation"]
            parts = [f"{label} {d[key]:g}" for label, key in (("CE", "ce_weight"), ("KL", "kl_weight"),
                                                                ("SquareHead", "hidden_weight")) if d[key]]
            teacher = f"distilled from the dense model ({', '.join(parts)}"
            teacher += f", T {d['temperature']:g})" if d["kl_weight"] else ")"
            note = teacher + (f"; {note}" if note else "")
        if method == "lora":
            note = (f"perplexity with the adapter unmerged: W + BA is {result['sparsity']:.2%} sparse "
                    f"over a {result['base_sparsity']:.2%} sparse base" + (f"; {note}" if note else ""))
        self.rows.append(ResultRow(name, "recover", method, structure, perplexity=result["evaluation"]["perplexity"],
                                   sparsity=result["sparsity"], seconds=result["train_seconds"], tokens_seen=result["tokens"],
                                   peak_memory_mb=result["peak_memory_mb"], peak_memory_kind=result["peak_memory_kind"],
                                   sparsity_after_merge=result["sparsity_after_merge"], note=note,
                                   zeroshot=result["evaluation"].get("zeroshot"), gap_won_back=gap))
        if "blockwise" in result:
            self.data.blockwise[name] = result["blockwise"]
        if "remasked" in result:
            remasked = result["remasked"]
            self.rows.append(ResultRow(f"{name}, merged + remasked", "recover", method, structure,
                                       perplexity=remasked["evaluation"]["perplexity"], sparsity=remasked["sparsity"],
                                       sparsity_after_merge=remasked["sparsity"],
                                       note="plain LoRA merged, then pruned weights zeroed again",
                                       zeroshot=remasked["evaluation"].get("zeroshot")))
        # stages finished before tokens_per_step was recorded: their steps stand in (plotted as tokens 0..)
        per_step = result.get("tokens_per_step") or (result["tokens"] // result["steps"] if result.get("steps") else 0)
        self.data.curves[name] = RecoveryCurve(
            loss=[(step * per_step, loss) for step, loss in result.get("loss_history", [])],
            perplexity=[(step * per_step, value) for step, value in result.get("eval_history", [])],
            dense_perplexity=result.get("eval_dense_perplexity"),
            text=result.get("eval_text", ""),
        )
        return name

    def add_errors(self, result: dict) -> None:
        self.data.errors = result["errors"]
        self.data.error_source = (f"{result['windows']} calibration windows x {result['seqlen']} tokens of "
                                  f"{result['dataset']}")
