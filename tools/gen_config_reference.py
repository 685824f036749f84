"""The pipeline file's key reference, generated from the dataclasses in prunetune.pipeline.config.

    python tools/gen_config_reference.py          # print the Markdown
    python tools/render_docs.py                   # writes it into docs/pipeline.md (marker config-reference)

Every key, its type, default and the comment written beside (or above) it in the source, one
table per section of the file. tests/unit/test_docs_tables.py fails when docs/pipeline.md no
longer matches the dataclasses, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from prunetune.pipeline.config import CalibrationSpec, EvaluationSpec, PipelineConfig, PruneSpec, RecoverySpec

SECTIONS = [
    ("Top level", "", PipelineConfig),
    ("calibration", "calibration.", CalibrationSpec),
    ("evaluation", "evaluation.", EvaluationSpec),
    ("prune (a list; one entry per pruned model)", "prune[].", PruneSpec),
    ("recover (a list; one entry per pruned model to recover)", "recover[].", RecoverySpec),
]
# Meanings for keys the source leaves uncommented (the source's own comment wins when there is one).
MEANINGS = {
    "model": "hub id, local folder, GGUF file, `tiny` (bundled) or `smollm2-135m`",
    "output_dir": "the run folder: report.md, results.json, plots, config.resolved.yaml",
    "title": "the report's heading",
    "dtype": "weights' dtype when loading: auto, float32, float16 or bfloat16",
    "seed": "seed of the recovery runs",
    "calibration.nsamples": "calibration windows",
    "calibration.seed": "seed that picks the calibration windows",
    "evaluation.split": "the split of the evaluation data scored",
    "prune[].method": "the pruning method",
    "prune[].sparsity_type": "unstructured, or N:M such as 2:4 or 4:8",
    "prune[].use_variant": "Wanda's variant (per-output thresholds found by search)",
    "recover[].methods": "recovery methods run on this pruned model, each its own stage",
    "recover[].block_size": "tokens per training block",
    "recover[].max_train_samples": "training blocks (null: all the data)",
    "recover[].num_train_epochs": "epochs when max_steps <= 0",
    "recover[].learning_rate": "peak learning rate",
    "recover[].per_device_train_batch_size": "blocks per device and step",
    "recover[].gradient_accumulation_steps": "batches per optimizer step",
    "recover[].lora_r": "adapter rank (lora, masked_lora)",
    "recover[].lora_alpha": "adapter scale numerator (lora, masked_lora)",
    "recover[].lora_dropout": "adapter dropout (null: each method's default)",
    "recover[].lora_target_modules": "layers to adapt: names, globs, or all-linear",
    "recover[].warmup_steps": "linear warm-up steps",
    "recover[].logging_steps": "steps between training-loss points",
    "recover[].per_device_eval_batch_size": "blocks per held-out evaluation forward",
}
NESTED = {"calibration": "the calibration section below", "evaluation": "the evaluation section below",
          "prune": "a list of prune entries (below)", "recover": "a list of recover entries (below)"}


def field_comments(cls) -> dict[str, str]:
    """Each field's comment: the ``# ...`` lines right above it and the one at the end of its line."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"\s{4}(\w+):\s*[^=#]+(?:=.*?)?(?:#\s*(.*))?$", line)
        if match and not line.startswith("        "):
            text = " ".join(above + ([match.group(2).strip()] if match.group(2) else []))
            comments[match.group(1)] = text
        above = []
    return comments


def _type_text(annotation: str) -> str:
    text = annotation.replace("Literal[", "one of [").replace('"', "")
    parts = [p.strip() for p in re.split(r"\|(?![^\[]*\])", text)]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    return " or ".join(parts) + (", or null" if optional else "")


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def reference_markdown() -> str:
    out: list[str] = []
    for title, prefix, cls in SECTIONS:
        comments = field_comments(cls)
        out += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            key = f"{prefix}{field.name}"
            meaning = (NESTED[field.name] if cls is PipelineConfig and field.name in NESTED
                       else comments.get(field.name) or MEANINGS.get(key, ""))
            out.append(f"| `{key}` | {_cell(_type_text(str(field.type)))} | `{_cell(_default_text(field))}` "
                       f"| {_cell(meaning or '')} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


if __name__ == "__main__":
    print(reference_markdown())
