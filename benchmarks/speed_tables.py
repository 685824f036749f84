"""The README's speed tables, in Markdown, from one ``benchmarks/gpu_check.sh`` results folder.

    python benchmarks/speed_tables.py benchmarks/results/h200_20261129_7033c3c           # a folder
    python benchmarks/speed_tables.py /work/.device/.../h200_20261129_7033c3c.tar.gz     # or the archive $OUT returned

Each of issue 16's targets is marked **met**, **not met** (with the figure) or *not measured* (the
section did not run, timed out before it, or the file is missing); the header names the commit, the
GPU and the versions the figures were measured with. The thresholds live in :data:`TARGETS` and
nowhere else. Reads only JSON, TSV and JUnit XML (no torch): ``tests/unit/test_speed_tables.py``
runs it on a made-up folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# issue 16's thresholds: (ratio or fraction, comparison)
TARGETS = {
    "wanda_sequential_x_pass": 1.15,  # Wanda --true_sequential / one calibration forward over all blocks
    "wanda_parallel_x_pass": 2.0,  # the papers' schedule / one calibration forward
    "stream_x_resident": 1.3,  # --compute_device cuda / the same run with the model resident
    "sparsegpt_x_floor": 1.5,  # SparseGPT (sequential) / (one forward + its Hessian inverses)
    "lora_mfu": 0.40,  # lora q/v r8 at the best micro-batch, bf16, block 1024
    "masked_lora_overhead": 0.10,  # masked_lora step time / lora's at the same micro-batch - 1
    "full_overhead": 0.03,  # full step time / a plain Trainer's - 1
}
MET, NOT_MET, UNMEASURED, REPORTED = "met", "**not met**", "*not measured*", "reported"


class Results:
    """The files of one results folder (or of its .tar.gz), by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files: dict[str, bytes] = {}
        if self.path.is_dir():
            for file in self.path.iterdir():
                if file.is_file():
                    self.files[file.name] = file.read_bytes()
            self.name = self.path.name
        else:
            with tarfile.open(self.path) as archive:
                for member in archive.getmembers():
                    if member.isfile():
                        self.files[Path(member.name).name] = archive.extractfile(member).read()
            self.name = self.path.name.split(".tar")[0]

    def json(self, name: str):
        try:
            return json.loads(self.files[name])
        except (KeyError, ValueError):
            return None

    def sections(self) -> dict[str, dict]:
        """section -> {rc, seconds, timeout} (the last run of each)."""
        text = self.files.get("sections.tsv", b"").decode()
        rows = {}
        for line in text.splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) == 4:
                rows[parts[0]] = {"rc": int(parts[1]), "seconds": int(parts[2]), "timeout": int(parts[3])}
        return rows


# --------------------------------------------------------------------------- formatting


def ratio_status(value: float | None, limit: float) -> str:
    if value is None:
        return UNMEASURED
    return MET if value <= limit else NOT_MET


def seconds(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f} s" if value >= 1 else f"{value * 1e3:.0f} ms")


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# --------------------------------------------------------------------------- pruning


def prune_result(data, method: str, schedule: str) -> dict | None:
    for result in (data or {}).get("results", []):
        if result["method"] == method and result["schedule"] == schedule:
            return result
    return None


def full_depth_seconds(data, result: dict | None) -> float | None:
    """Seconds for the whole model: measured, or extrapolated when fewer blocks were built."""
    if result is None:
        return None
    if result.get("blocks_built", 0) < (data or {}).get("full_depth", 0):
        return result.get("extrapolated_seconds_full_depth")
    return result["seconds"]


def check_text(result: dict | None) -> str:
    if result is None:
        return "-"
    checks = result.get("checks")
    if not checks:
        return result.get("check_skipped", "not checked")
    if "error" in checks:
        return f"check incomplete: {checks['error']}"
    scope = f"first + last linear of {checks['blocks_checked']} blocks"
    if "all_masks_equal_formula" in checks:
        verdict = ("mask = float64 formula" if checks["all_masks_equal_formula"]
                   else f"{checks['mismatches_beyond_rounding']} mismatches beyond rounding")
        return f"{verdict} ({checks['mask_mismatches']} rounding ties), {scope}"
    return (f"error {checks['mean_error_ratio_vs_magnitude']:.3f} x magnitude's (max {checks['max_error_ratio_vs_magnitude']:.3f}), "
            f"{scope}")


def checks_status(data, method: str) -> tuple[str, str]:
    """Both schedules' checks of ``method`` on every block: (figure, status)."""
    results = [r for r in (data or {}).get("results", []) if r["method"] == method]
    checked = [r for r in results if r.get("checks") and "error" not in r["checks"]]
    if not checked:
        return "-", UNMEASURED
    built = data.get("layers_built", data.get("full_depth"))
    every_block = all(r["checks"]["blocks_checked"] >= built for r in checked)
    if method == "wanda":
        ok = all(r["checks"]["all_masks_equal_formula"] and r["checks"]["all_structures_ok"] for r in checked)
        beyond = sum(r["checks"]["mismatches_beyond_rounding"] for r in checked)
        ties = sum(r["checks"]["mask_mismatches"] - r["checks"]["mismatches_beyond_rounding"] for r in checked)
        figure = f"{beyond} mismatches beyond rounding, {ties} rounding ties"
    else:
        ok = all(r["checks"]["all_below_magnitude"] and r["checks"]["all_structures_ok"] for r in checked)
        figure = "error / magnitude's at most " + ", ".join(
            f"{r['checks']['max_error_ratio_vs_magnitude']:.3f} ({r['schedule']})" for r in checked)
    layers = sum(r["checks"]["layers_checked"] for r in checked)
    schedules = ", ".join(r["schedule"] for r in checked)
    figure += f"; {layers} layers ({schedules})" + ("" if every_block else ", not every block")
    if len(checked) < len(results):
        figure += f"; {len(results) - len(checked)} run(s) unchecked"
    return figure, MET if ok and every_block and len(checked) == len(results) else NOT_MET


def pruning_lines(resident, stream) -> list[str]:
    if not resident:
        return ["*Pruning: not measured.*"]
    shape = resident.get("shape") or {}
    model = ("a Llama-2-7B-shaped model" if resident.get("llama2_7b_shape") else
             f"a Llama of hidden size {shape.get('hidden')}" if shape else f"the {resident.get('model')} model")
    lines = [f"Pruning {model} (random {resident['dtype'].replace('torch.', '')} weights, "
             f"{resident['nsamples']} x {resident['seqlen']} calibration tokens, {resident['full_depth']} blocks; "
             f"`benchmarks/prune_bench.py`). \"x pass\": pruning time / one plain calibration forward over all blocks "
             f"(the floor of a one-forward schedule); SparseGPT's floor adds its Hessian inverses. Peak memory: "
             f"`torch.cuda.max_memory_allocated`, {resident.get('model_gib', 0):.1f} GiB of weights included when "
             f"resident; with `--compute_device cuda` the model stays in CPU memory"
             + (f" ({stream['layers_built']} blocks timed, full depth extrapolated)" if stream and
                stream.get("layers_built", 0) < stream.get("full_depth", 0) else "") + ".", ""]
    rows = []
    for method in ("wanda", "sparsegpt"):
        for schedule in ("sequential", "parallel"):
            r = prune_result(resident, method, schedule)
            s = prune_result(stream, method, schedule)
            if r is None and s is None:
                continue
            structure = resident["sparsity_type"]
            if structure == "unstructured":
                structure = "{:.0%}".format(resident["sparsity_ratio"])
            name = ("Wanda " if method == "wanda" else "SparseGPT ") + structure
            label = "`--true_sequential`" if schedule == "sequential" else "papers'"
            stream_seconds = full_depth_seconds(stream, s)
            resident_seconds = full_depth_seconds(resident, r)
            stream_text = "-"
            if s is not None:
                stream_text = f"{seconds(stream_seconds)}, {gib(s['peak_memory_gib'])}"
                if stream_seconds and resident_seconds:
                    stream_text += f" ({stream_seconds / resident_seconds:.2f} x resident)"
            floor = f"{r['ratio_to_floor']:.2f} x ({seconds(r['floor_seconds'])})" if r and "ratio_to_floor" in r else "-"
            rows.append([name, label, seconds(resident_seconds) + (f" ({r['per_block_seconds']:.2f} s/block)" if r else ""),
                         f"{r['ratio_to_one_pass']:.2f} x ({seconds(r['calibration_pass_seconds'])})" if r else "-",
                         floor, gib(r["peak_memory_gib"]) if r else "-", stream_text, check_text(r)])
    lines += table(["method", "schedule", "time", "x pass", "SparseGPT x floor", "peak GPU memory, resident",
                    "`--compute_device cuda`: time, peak", "check"], rows)
    skipped = (resident.get("skipped") or []) + ((stream or {}).get("skipped") or [])
    if skipped:
        lines += ["", "Skipped for time: " + "; ".join(skipped) + "."]
    return lines


# --------------------------------------------------------------------------- recovery


def recovery_row(data, case: str, batch: int | None = None) -> dict | None:
    rows = [r for r in (data or {}).get("rows", []) if r["case"] == case and "tokens_per_second" in r
            and (batch is None or r["micro_batch"] == batch)]
    return max(rows, key=lambda r: r["micro_batch"]) if rows else None


def best_lora(data) -> dict | None:
    rows = [r for r in (data or {}).get("rows", []) if r.get("best_micro_batch")]
    return rows[0] if rows else None


def overhead(row: dict | None, reference: dict | None) -> float | None:
    if row is None or reference is None:
        return None
    return row["step_seconds"] / reference["step_seconds"] * reference["micro_batch"] / row["micro_batch"] - 1


def recovery_lines(data, compiled) -> list[str]:
    if not data:
        return ["*Recovery throughput: not measured.*"]
    case = data["case"]
    flops = data["flops"]
    shape = "Llama-2-7B shape" if data.get("llama2_7b_shape") else f"Llama, hidden {data.get('shape', {}).get('hidden')}"
    lines = [f"Recovery throughput (`benchmarks/recover_throughput.py`: {shape}, {case['dtype']}, block "
             f"{case['block']}, `prunetune recover`'s Trainer path with its defaults; {case['warmup']} + {case['steps']} steps). "
             f"MFU = tokens/s x ({flops['formula']}: {flops['model_flops_per_token'] / 1e9:.1f} GFLOP/token) / "
             f"{data.get('peak_tflops') or float('nan'):.0f} TFLOP/s ({data.get('peak_source')}); \"work\" counts only what "
             f"the step computes (4 N for frozen weights)."
             + (f" A measured 8192^3 bf16 matmul ran at {data['measured_matmul_tflops']:.0f} TFLOP/s."
                if data.get("measured_matmul_tflops") else "")
             + f" Fused loss: {data.get('fused_loss')}; attention: {data.get('attention_implementation')}.", ""]
    references = {"masked_lora q/v r8": "lora q/v r8 (sweep)", "masked_lora all-linear r8": "lora all-linear r8",
                  "full (masked full fine-tuning)": "plain Trainer, full fine-tuning",
                  "lora q/v r8, fused linear+CE": "lora q/v r8 (sweep)", "lora q/v r8, torch.compile blocks": "lora q/v r8 (sweep)",
                  "plain PEFT LoRA loop q/v r8": "lora q/v r8 (sweep)"}
    rows = []
    for r in data["rows"] + [r for r in (compiled or {}).get("rows", []) if r.get("compiled")]:
        if "tokens_per_second" not in r:
            rows.append([r["case"], str(r["micro_batch"]), r.get("error") or f"skipped: {r.get('skipped', '')}", "-", "-", "-"])
            continue
        reference = recovery_row(data, references.get(r["case"], ""), r["micro_batch"])
        cost = overhead(r, reference)
        mfu = f"{r['mfu']:.1%} (work {r['work_utilization']:.1%})" if r.get("mfu") is not None else "-"
        name = r["case"] + (" **best**" if r.get("best_micro_batch") else "")
        rows.append([name, str(r["micro_batch"]), f"{r['tokens_per_second']:,.0f}", mfu, gib(r["peak_memory_gib"]),
                     f"{cost:+.1%} vs {references[r['case']]}" if cost is not None else ""])
    lines += table(["case", "micro-batch", "tokens/s", "MFU", "peak GPU memory", "step time vs"], rows)
    return lines


# --------------------------------------------------------------------------- 2:4


def sparse_lines(data) -> list[str]:
    if not data:
        return ["*2:4 inference: not measured.*"]
    if data.get("skipped"):
        return [f"2:4 inference: skipped on {data['device']}: {data['skipped']}."]
    lines = [f"2:4 semi-structured inference (`benchmarks/semi_structured_bench.py`, fp16, backends: "
             f"{', '.join(data['backends'])}): tokens/s of the 32 blocks' linear layers (GPU time, CUDA graph replay) "
             f"and of the whole 7B-shaped model (decode-shaped: B sequences x 1 token, no KV cache); speedup = dense "
             f"time / 2:4 time.", ""]
    rows = []
    for entry in data.get("block_linears", []):
        if entry["impl"] == "dense":
            continue
        key = (entry["tokens"], entry["layout"])
        dense = next((e for e in data["block_linears"] if e["impl"] == "dense" and (e["tokens"], e["layout"]) == key), {})
        model = next((m for m in data.get("model", [])
                      if (m.get("impl"), m.get("tokens"), m.get("layout")) == (entry["impl"], *key)), {})
        mode = "graph" if entry.get("graph_speedup") else "eager"
        model_mode = "graph" if model.get("graph_speedup") else "eager"
        rows.append([str(entry["tokens"]), entry["layout"], entry["impl"],
                     f"{dense.get(f'{mode}_tokens_per_second', 0):,.0f}", f"{entry.get(f'{mode}_tokens_per_second', 0):,.0f}",
                     f"{entry.get(f'{mode}_speedup', float('nan')):.2f} x" + ("" if mode == "graph" else " (eager)"),
                     f"{model.get(f'{model_mode}_speedup', float('nan')):.2f} x" + ("" if model_mode == "graph" else " (eager)")
                     if model else "-"])
    lines += table(["tokens", "shape", "2:4 backend", "dense linears tok/s", "2:4 linears tok/s", "linears speedup",
                    "model speedup"], rows)
    if data.get("layers_correct") is False:
        lines += ["", "**Some 2:4 results differ from the dense matmul beyond rounding** (see the JSON)."]
    return lines


# --------------------------------------------------------------------------- targets


def target_rows(res: Results) -> list[list[str]]:
    prune, stream = res.json("prune_bench.json"), res.json("prune_bench_stream.json")
    recover, sparse = res.json("recover_throughput.json"), res.json("semi_structured_bench.json")
    rows = []

    def ratio_row(label, result, key, limit):
        value = result.get(key) if result else None
        figure = f"{value:.2f} x" if value is not None else "-"
        if value is not None and key == "ratio_to_one_pass":
            figure += f" ({seconds(result['seconds'])} / {seconds(result['calibration_pass_seconds'])})"
        if value is not None and key == "ratio_to_floor":
            figure += f" ({seconds(result['seconds'])} / {seconds(result['floor_seconds'])})"
        if result is not None and key in ("ratio_to_one_pass", "ratio_to_floor"):
            figure += f", peak {gib(result['peak_memory_gib'])}"
        rows.append([label, f"<= {limit}", figure, ratio_status(value, limit)])

    ratio_row("1. Wanda `--true_sequential` / one calibration pass", prune_result(prune, "wanda", "sequential"),
              "ratio_to_one_pass", TARGETS["wanda_sequential_x_pass"])
    ratio_row("1. Wanda, papers' schedule / one calibration pass", prune_result(prune, "wanda", "parallel"),
              "ratio_to_one_pass", TARGETS["wanda_parallel_x_pass"])
    for schedule in ("sequential", "parallel"):
        s, r = prune_result(stream, "wanda", schedule), prune_result(prune, "wanda", schedule)
        s_seconds, r_seconds = full_depth_seconds(stream, s), full_depth_seconds(prune, r)
        value = s_seconds / r_seconds if s_seconds and r_seconds else None
        figure = (f"{value:.2f} x ({seconds(s_seconds)} / {seconds(r_seconds)}), peak {gib(s['peak_memory_gib'])}"
                  if value is not None else "-")
        rows.append([f"1. Wanda {schedule}, `--compute_device cuda` / resident", f"<= {TARGETS['stream_x_resident']}",
                     figure, ratio_status(value, TARGETS["stream_x_resident"])])
    figure, status = checks_status(prune, "wanda")
    rows.append(["1. Wanda masks = float64 formula, first + last linear of every block", "0 beyond rounding", figure, status])
    ratio_row("2. SparseGPT `--true_sequential` / (one pass + Hessian inverses)", prune_result(prune, "sparsegpt", "sequential"),
              "ratio_to_floor", TARGETS["sparsegpt_x_floor"])
    parallel = prune_result(prune, "sparsegpt", "parallel")
    rows.append(["2. SparseGPT, papers' schedule / (one pass + Hessian inverses)", "reported",
                 f"{parallel['ratio_to_floor']:.2f} x, peak {gib(parallel['peak_memory_gib'])}"
                 if parallel and "ratio_to_floor" in parallel else "-",
                 REPORTED if parallel else UNMEASURED])
    figure, status = checks_status(prune, "sparsegpt")
    rows.append(["2. SparseGPT error below magnitude's, first + last linear of every block", "all layers", figure, status])

    best = best_lora(recover)
    rows.append(["3. `lora` q/v r8 MFU at the best micro-batch", f">= {TARGETS['lora_mfu']:.0%}",
                 f"{best['mfu']:.1%} at micro-batch {best['micro_batch']} ({best['tokens_per_second']:,.0f} tokens/s)"
                 if best and best.get("mfu") is not None else "-",
                 UNMEASURED if not best or best.get("mfu") is None else (MET if best["mfu"] >= TARGETS["lora_mfu"] else NOT_MET)])

    def overhead_row(label, case, reference_case, limit):
        row = recovery_row(recover, case)
        reference = recovery_row(recover, reference_case, row["micro_batch"]) if row else None
        value = overhead(row, reference)
        figure = "-" if value is None else (f"{value:+.1%} at micro-batch {row['micro_batch']}, peak {gib(row['peak_memory_gib'])} "
                                            f"vs {gib(reference['peak_memory_gib'])}")
        rows.append([label, f"<= +{limit:.0%} step time", figure, ratio_status(value, limit)])

    overhead_row("3. `masked_lora` q/v vs `lora` q/v", "masked_lora q/v r8", "lora q/v r8 (sweep)", TARGETS["masked_lora_overhead"])
    overhead_row("3. `masked_lora` all linear vs `lora` all linear", "masked_lora all-linear r8", "lora all-linear r8",
                 TARGETS["masked_lora_overhead"])
    overhead_row("3. `full` vs a plain Trainer", "full (masked full fine-tuning)", "plain Trainer, full fine-tuning",
                 TARGETS["full_overhead"])
    verdict = (sparse or {}).get("verdict")
    if verdict:
        wins = verdict["block_linears_faster_at"] + verdict["model_faster_at"]
        figure = "faster at: " + "; ".join(wins) if wins else f"not faster anywhere (threshold {verdict['threshold']:.0%})"
        rows.append(["4. 2:4 (cuSPARSELt / CUTLASS) faster than dense fp16", "report", figure, REPORTED])
    else:
        reason = (sparse or {}).get("skipped")
        rows.append(["4. 2:4 (cuSPARSELt / CUTLASS) faster than dense fp16", "report", f"skipped: {reason}" if reason else "-",
                     UNMEASURED])
    return rows


# --------------------------------------------------------------------------- other checks


def other_lines(res: Results) -> list[str]:
    lines = []
    xml = res.files.get("gpu_tests.xml")
    if xml:
        root = ElementTree.fromstring(xml)
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines.append(f"- GPU tests (`pytest -m gpu`): {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped.")
    precision = res.json("masked_lora_precision.json")
    if precision:
        parts = [f"{row['setting']}: new_fused slope {row['new_fused']:.3f} (peft_lora {row['peft_lora']:.3f})"
                 for row in precision.get("precision", [])]
        lines.append(f"- masked LoRA fused forward (`masked_lora_precision.py`, {precision.get('name')}): " + "; ".join(parts) + ".")
    full = res.json("full_7b_memory.json")
    if full:
        parts = []
        for row in full:
            if "error" not in row:
                peak = f"{row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else "no GPU peak"
                parts.append(f"{row['setup']}: {peak} measured vs {row.get('predicted_peak_gib', float('nan')):.1f} predicted, "
                             f"{row.get('tokens_per_s', 0):,.0f} tokens/s, {row.get('pruned_nonzero', '?')} pruned weights nonzero")
            else:
                parts.append(f"{row['setup']}: {row.get('error', 'no figure')[:160]}")
        lines.append("- `full` on a 7B shape, peak memory (`full_7b_memory.py`): " + "; ".join(parts) + ".")
    sections = res.sections()
    problems = []
    for name, section in sections.items():
        if section["rc"] != 0:
            how = "timed out" if section["rc"] in (124, 137) else "exit code {}".format(section["rc"])
            problems.append(f"{name} {how} after {section['seconds']} s")
    if sections:
        lines.append("- Sections: " + ", ".join(f"{name} {s['seconds']} s" for name, s in sections.items())
                     + (f"; **{'; '.join(problems)}**" if problems else "; all finished") + ".")
    return lines


def profile_lines(res: Results, missed: list[str]) -> list[str]:
    data = res.json("profile_block.json")
    if not data or not missed:
        return []
    lines = ["", "### Where the time goes (`benchmarks/profile_block.py`, 2 blocks / one training step)", ""]
    for part in ("prune", "train"):
        for row in data.get(part, []):
            if "top_ops" not in row:
                continue
            title = f"{part} {row.get('method')} {row.get('schedule', row.get('targets', ''))}"
            busy = row.get("device_busy_seconds")
            ops = ", ".join(f"{op['name']} {op['self_ms']:.0f} ms" for op in row["top_ops"][:6])
            lines.append(f"- {title}: {row['wall_seconds']:.2f} s wall"
                         + (f", GPU busy {busy:.2f} s ({1 - busy / row['wall_seconds']:.0%} idle)" if busy else "") + f"; {ops}")
    return lines


def render(path: str | Path) -> str:
    res = Results(path)
    env = res.json("env.json") or {}
    prune, stream = res.json("prune_bench.json"), res.json("prune_bench_stream.json")
    gpu = env.get("gpu") or (prune or {}).get("device") or "unknown GPU"
    commit = env.get("commit", "unknown")
    packages = env.get("packages", {})
    versions = ", ".join(f"{name} {packages[name]}" for name in ("torch", "transformers", "peft", "accelerate") if packages.get(name))
    ceilings = env.get("ceilings") or {}
    lines = [f"## Speed (one {gpu}, measured at commit `{commit[:12]}` with `bash benchmarks/gpu_check.sh`)", "",
             f"Measured {env.get('date', 'on an unknown date')}" + (f" with {versions}" if versions else "")
             + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + "."
             + (f" Ceilings measured on this card: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, device copy "
                f"{ceilings['device_copy_gb_s'] / 1e3:.1f} TB/s, host to device {ceilings['host_to_device_pinned_gb_s']:.0f} GB/s "
                f"pinned / {ceilings['host_to_device_pageable_gb_s']:.0f} GB/s pageable." if ceilings else "")
             + f" Raw JSON and logs: `benchmarks/results/{res.name}/`.", "", "### Issue 16's targets", ""]
    targets = target_rows(res)
    lines += table(["target", "threshold", "measured", "status"], targets)
    missed = [row[0] for row in targets if row[3] == NOT_MET]
    lines += ["", "### Pruning", ""] + pruning_lines(prune, stream)
    lines += ["", "### Recovery", ""] + recovery_lines(res.json("recover_throughput.json"), res.json("recover_compile.json"))
    lines += ["", "### 2:4 inference", ""] + sparse_lines(res.json("semi_structured_bench.json"))
    other = other_lines(res)
    if other:
        lines += ["", "### Other GPU checks", ""] + other
    lines += profile_lines(res, missed)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a gpu_check.sh results folder, or its .tar.gz")
    args = parser.parse_args(argv)
    if not Path(args.results).exists():
        print(f"no such folder or archive: {args.results}", file=sys.stderr)
        return 2
    sys.stdout.write(render(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
