"""Render every table of figures in README.md and docs/ from the JSON it comes from.

    python tools/render_docs.py            # rewrite the marked tables in place
    python tools/render_docs.py --check    # exit 1, naming each table, when a committed table differs

A table lives between two markers, ``<!-- table:ID -->`` and ``<!-- /table -->``; ID names a
renderer below and, through it, its source: a pipeline run's ``results.json`` (docs/<run>/),
a benchmark's JSON (benchmarks/results/), or the pipeline config dataclasses. Each rendered
results table carries its provenance (command, commit, machine, date, wall time, from
docs/provenance.json) as a caption. tests/unit/test_docs_tables.py runs the check, so a number
edited by hand, or a results file replaced without re-rendering, fails the tests.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from gen_config_reference import reference_markdown  # noqa: E402

from prunetune.report import ResultRow, markdown_table  # noqa: E402

MARKER = re.compile(r"(<!-- table:(?P<id>[\w.:/-]+) -->)(?P<body>.*?)(<!-- /table -->)", re.S)
FILES = ["README.md", "docs/**/*.md"]


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _rows(path: str) -> dict[str, dict]:
    return {row["name"]: row for row in _load(path)["rows"]}


PAGE = ["docs/index.md"]  # the page being rendered: links in captions are relative to it


def _caption(*sources: str) -> str:
    """The provenance of each source, as an italic caption under its table."""
    provenance = _load("docs/provenance.json")
    lines = []
    for source in sources:
        p = provenance[source]
        lines.append(f"*Source: {_link(source)} · command `{p['command']}` · commit "
                     f"{p['commit']} · {p['machine']} · {p['date']} · wall time: {p['wall_time']}.*")
    return "\n\n".join(lines)


def _link(source: str) -> str:
    """A link to a source under docs/ (relative to the page), else the path in the repository."""
    if not source.startswith("docs/") or not PAGE[0].startswith("docs/"):
        return f"`{source}`"
    return f"[`{source}`]({os.path.relpath(source, os.path.dirname(PAGE[0]))})"


def _gap(pruned: float, recovered: float, dense: float) -> str:
    return f"{(pruned - recovered) / (pruned - dense):.1%}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def results_table(run: str) -> str:
    """A pipeline run's own table (the one its report.md opens with), with the run's provenance."""
    source = f"docs/{run}/results.json"
    names = {f.name for f in dataclasses.fields(ResultRow)}
    data = _load(source)
    rows = [ResultRow(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
    return markdown_table(rows) + "\n\n" + _texts(data) + "\n\n" + _caption(source)


def _texts(data: dict) -> str:
    """Which text each figure of a run is scored on: the table and bar plot, and the held-out curves."""
    out = f"Which text: the perplexity column and the bar plot score {data['facts']['evaluation']}."
    curves = [c for c in data.get("curves", {}).values() if c.get("perplexity")]
    for text in sorted({c.get("text", "") for c in curves}):
        dense = next(c.get("dense_perplexity") for c in curves if c.get("text", "") == text)
        out += (f" The held-out curve scores {text or 'held-out blocks of the training data'}, another text"
                + (f" (dense: {dense:.2f} there)" if dense else "") + ".")
    return out


def gap_table(run: str, readme: bool = False) -> str:
    """Dense, each pruned model that was recovered, each recovery: perplexity, gap won back, cost, merged sparsity."""
    source = f"docs/{run}/results.json"
    rows = _rows(source)
    dense = rows["dense"]["perplexity"]
    lines = ["| configuration | perplexity | gap won back | tokens trained | training time | tokens/s | sparsity after merge |",
             "|---|---|---|---|---|---|---|", f"| dense | {dense:.2f} | - | - | - | - | {rows['dense']['sparsity']:.2%} |"]
    recovered = [r for r in rows.values() if r["stage"] == "recover" and "merged + remasked" not in r["name"]]
    for base in dict.fromkeys(r["name"].split(" + ")[0] for r in recovered):
        lines.append(f"| {base} (pruned) | {rows[base]['perplexity']:.2f} | 0% | - | - | - | {rows[base]['sparsity']:.2%} |")
        for row in (r for r in recovered if r["name"].startswith(base + " + ")):
            merged = row.get("sparsity_after_merge")
            note = " (densifies when merged)" if row["method"] == "lora" else ""
            # block-wise counts each calibration token once per block and pass it trains on
            passes = " block-token passes" if row["method"] == "blockwise" else ""
            lines.append(f"| {row['name']}{note} | {row['perplexity']:.2f} | {_gap(rows[base]['perplexity'], row['perplexity'], dense)} "
                         f"| {row['tokens_seen']:,}{passes} | {_seconds(row['seconds'])} | {row['tokens_seen'] / row['seconds']:.0f} "
                         f"| {'-' if merged is None else f'{merged:.2%}'} |")
    if readme:
        return "\n".join(lines)
    return "\n".join(lines) + "\n\n" + _caption(source)


def distill_pairs(run: str) -> str:
    """Cross-entropy against distilled recovery, same pruned model, method and tokens."""
    source = f"docs/{run}/results.json"
    rows = _rows(source)
    dense = rows["dense"]["perplexity"]
    lines = ["| pruned model | method | tokens | cross-entropy | gap won back | distilled | gap won back |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        if row["stage"] != "recover" or row["name"].endswith("+ distill") or "merged" in row["name"]:
            continue
        distilled = rows.get(row["name"] + " + distill")
        if distilled is None:
            continue
        base = row["name"].split(" + ")[0]
        pruned = rows[base]["perplexity"]
        lines.append(f"| {base} ({pruned:.2f}) | {row['method']} | {row['tokens_seen']:,} | {row['perplexity']:.2f} "
                     f"| {_gap(pruned, row['perplexity'], dense)} | {distilled['perplexity']:.2f} "
                     f"| **{_gap(pruned, distilled['perplexity'], dense)}** |")
    return "\n".join(lines) + f"\n\nDense: {dense:.2f}.\n\n" + _caption(source)


def curve_table(run: str) -> str:
    """Final test perplexity and the held-out curve of each recovery of a run, with the text the curve is on."""
    source = f"docs/{run}/results.json"
    data = _load(source)
    rows = {row["name"]: row for row in data["rows"]}
    dense = rows["dense"]["perplexity"]
    curves = data["curves"]
    first = next(iter(curves.values()))
    points = [tokens for tokens, _ in first["perplexity"]]
    header = " / ".join(f"{t // 1000}k" if t else "0" for t in points)
    lines = [f"| recovery | test perplexity | gap won back | held-out perplexity at {header} tokens |", "|---|---|---|---|"]
    for name, curve in curves.items():
        row, pruned = rows[name], rows[name.split(" + ")[0]]["perplexity"]
        values = " / ".join(f"{ppl:.2f}" for _, ppl in curve["perplexity"])
        lines.append(f"| {name} | {row['perplexity']:.2f} | {_gap(pruned, row['perplexity'], dense)} | {values} |")
    texts = sorted({c.get("text", "") for c in curves.values()})
    return ("\n".join(lines) + f"\n\nTest perplexity: {data['facts']['evaluation']}; dense {dense:.2f}. Held-out curve: "
            + "; ".join(texts) + f"; dense {first['dense_perplexity']:.2f} on it.\n\n" + _caption(source))


def profile_table(run: str, readme: bool = False) -> str:
    """Uniform against layer-wise sparsity (OWL, a profile file): each method and target ratio a run pruned both ways."""
    source = f"docs/{run}/results.json"
    data = _load(source)
    perplexity = {row["name"]: row["perplexity"] for row in data["rows"]}
    seconds = {row["name"]: row["seconds"] for row in data["rows"]}
    profiles = data.get("sparsity_profiles", {})
    uniform = {(p["method"], p["target"]): name for name, p in profiles.items() if p["profile"] == "uniform"}
    pairs = sorted((p["method"], p["target"], p["profile"], uniform[(p["method"], p["target"])], name)
                   for name, p in profiles.items() if p["profile"] != "uniform" and (p["method"], p["target"]) in uniform)
    names = sorted({profile for _, _, profile, _, _ in pairs})
    single = names[0] if len(names) == 1 else None
    shown = {"owl": "OWL"}.get(single, single) if single else "profiled"
    lines = [f"| method | target sparsity | uniform perplexity | {shown} perplexity | change | {shown} overall sparsity "
             f"| {shown} block ratios (min–max) | pruning time, uniform / {shown} |", "|---|---|---|---|---|---|---|---|"]
    for method, target, profile, plain, profiled in pairs:
        entry, ratios = profiles[profiled], list(profiles[profiled]["sparsity_profile"]["block_ratios"].values())
        change = perplexity[profiled] / perplexity[plain] - 1
        which = "" if single else f" ({profile})"
        lines.append(f"| {method} | {target:.0%} | {perplexity[plain]:.2f} | {perplexity[profiled]:.2f}{which} | {change:+.1%} "
                     f"| {entry['sparsity']:.2%} | {min(ratios):.1%}–{max(ratios):.1%} "
                     f"| {_seconds(seconds[plain])} / {_seconds(seconds[profiled])} |")
    if not pairs:
        lines = ["No method and target ratio of this run was pruned both uniformly and with a layer-wise profile."]
    dense = next((row["perplexity"] for row in data["rows"] if row["stage"] == "dense"), None)
    setup = (f"Change: the profiled model's perplexity against the uniform one's (negative: better). Perplexity on "
             f"{data['facts']['evaluation']}" + (f"; dense {dense:.2f}." if dense is not None else ".")
             + " Pruning time includes the calibration pass (and the profile's statistics pass).")
    if readme:
        return "\n".join(lines)
    return "\n".join(lines) + f"\n\n{setup}\n\n" + _caption(source)


def h100_prune() -> str:
    source = "benchmarks/results/h100_prune_bench.json"
    data = _load(source)
    lines = [f"| method | time, {data['full_depth']} blocks | per block | time / two calibration passes | peak GPU memory | quality check |",
             "|---|---|---|---|---|---|"]
    for r in data["results"]:
        q = r["quality"]
        check = (f"mask equals the formula ({q['mask_mismatches']} mismatches)" if "mask_mismatches" in q
                 else f"reconstruction error {q['error_ratio_vs_magnitude']:.3f} x magnitude's")
        lines.append(f"| {r['method']} 50% | {r['seconds']:.1f} s | {r['per_block_seconds']:.2f} s | {r['ratio_to_two_passes']:.2f} "
                     f"| {r['peak_memory_gib']:.1f} GiB | {check} |")
    setup = (f"{data['device']}, torch {data['torch']}, random {data['dtype'].replace('torch.', '')} weights of a "
             f"Llama-2-7B shape, {data['nsamples']} x {data['seqlen']} calibration tokens.")
    return "\n".join(lines) + f"\n\n{setup}\n\n" + _caption(source)


def h100_recover() -> str:
    source = "benchmarks/results/h100_recover_bench.json"
    data = _load(source)
    rows = {r["case"]: r for r in data["rows"]}
    reference = {"prunetune_lora": "peft_lora_loop", "prunetune_masked_lora": "peft_lora_loop",
                 "masked_full_loop": "full_loop", "prunetune_full": "trainer_full"}
    lines = ["| case | model shape | tokens/s | peak GiB | cost vs its reference |", "|---|---|---|---|---|"]
    for case, r in rows.items():
        ref = reference.get(case)
        cost = f"{rows[ref]['tokens_per_second'] / r['tokens_per_second'] - 1:+.1%} vs {ref}" if ref else ""
        lines.append(f"| {case} | {r['model']} | {r['tokens_per_second']:,.0f} | {r['peak_memory_bytes'] / 2**30:.1f} | {cost} |")
    case = data["case"]
    setup = f"{data['device']}, bf16, block {case['block']}, micro-batch {case['batch']}, no gradient checkpointing."
    return "\n".join(lines) + f"\n\n{setup}\n\n" + _caption(source)


def _bench_caption(records: list[dict]) -> str:
    """Provenance of benchmark records that carry their own (command, commit, date, machine)."""
    lines = []
    for r in records:
        machine = r["machine"]
        threads = machine.get("threads")
        where = f"{machine.get('cpus', '?')}-core CPU, {threads} threads, torch {machine.get('torch', '?')}"
        # a local cache of the pruned model and where the record was written: paths of one machine, not settings
        command = re.sub(r" --(pruned_cache|json) \S+", "", r["command"])
        lines.append(f"*`{command}` · commit {r['commit']} · {r['date'][:16].replace('T', ' ')} UTC · {where}.*")
    return "\n\n".join(lines)


# the reference texts of ../shared/data, by file name (blockwise_smollm2.py) and by id (prune_reconstruct_smollm2.py)
TEXT_NAMES = {"train.txt": "Tiny Shakespeare", "validation.jsonl": "WikiText-2 validation",
              "tinyshakespeare": "Tiny Shakespeare", "wikitext2-validation": "WikiText-2 validation"}


def blockwise_bench() -> str:
    """benchmarks/blockwise_smollm2.py: Wanda 50% on SmolLM2-135M, then block-wise reconstruction alone."""
    paths = sorted((ROOT / "benchmarks/results").glob("blockwise_*.json"))
    records = [json.loads(path.read_text()) for path in paths]
    records.sort(key=lambda r: r["date"])
    lines = ["| reconstruction text | loss | inputs | window | calibration tokens | passes | lr | perplexity after | gap won back | wall time | CPU time | load average (1 min, start -> end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s, load = r["settings"], r["load_average"]
        text = TEXT_NAMES.get(Path(s["calib_dataset"]).name, Path(s["calib_dataset"]).name)
        lines.append(f"| {text} | {s.get('loss', 'block')} | {s['input_mode']} | {s['window']} | {s['nsamples']} x {s['seqlen']} | {s['epochs']} | {s['learning_rate']:g} "
                     f"| {r['ppl_after']:.2f} | {r['gap_won_back']:.1%} | {r['minutes']:.1f} min | {r['cpu_minutes']:.1f} min "
                     f"| {load['start'][0]:.1f} -> {load['after_reconstruction'][0]:.1f} |")
    first = records[0]
    setup = ("Loss: block, the block-output error normalised over the batch (the paper's); token, each token's error "
             "over its own target norm. "
             f"SmolLM2-135M, dense {first['ppl_dense']:.2f}, Wanda 50% {first['ppl_pruned']:.2f} (128 x 128 calibration "
             "tokens of Tiny Shakespeare); reconstruction on the text named in the first column, never the evaluation text; "
             "perplexity on WikiText-2 raw test, first 12 windows of 512 tokens. Sparsity after every run: exactly 50.00%. Wall times depend on what else ran on "
             "the two cores (the load average column); CPU time is the process's own.")
    return "\n".join(lines) + f"\n\n{setup}\n\n" + _bench_caption(records)


def prune_reconstruct() -> str:
    """benchmarks/prune_reconstruct_smollm2.py: Wanda 50% on SmolLM2-135M, plain and with --reconstruct, per calibration text."""
    source = "benchmarks/results/prune_reconstruct_smollm2.json"
    runs = _load(source)["runs"]
    by = {(r.get("calibration_text", "tinyshakespeare"), r["plain"]): r for r in runs}
    dense = _rows("docs/smollm2/results.json")["dense"]["perplexity"]  # the same model, text and windows
    lines = ["| calibration text | plain pruning | with `--reconstruct` | gap won back | pruning time, plain / with |",
             "|---|---|---|---|---|"]
    for text in sorted({t for t, _ in by}):
        if (text, True) not in by or (text, False) not in by:
            continue
        plain, repaired = by[(text, True)], by[(text, False)]
        gap = (plain["ppl"] - repaired["ppl"]) / (plain["ppl"] - dense)
        lines.append(f"| {TEXT_NAMES.get(text, text)} | {plain['ppl']:.2f} | {repaired['ppl']:.2f} | {gap:.0%} "
                     f"| {plain['prune_wall_s']:.0f} s / {repaired['prune_wall_s']:.0f} s |")
    setup = (f"Gap won back against the dense model's {dense:.2f}. Pruning times on two cores; the load average at "
             "the end of each run is in the results file (the Tiny Shakespeare runs had another job beside them).")
    sources = sorted(by.values(), key=lambda r: r["date"])
    captions = [f"*`{r['command']}` · commit {r['commit']} · {r['date'][:10]} · {r['machine']['cpus']}-core CPU, "
                f"{r['machine']['threads']} threads, torch {r['machine']['torch']}.*" for r in sources]
    return "\n".join(lines) + f"\n\n{setup}\n\n" + "\n\n".join(captions)


def owl_bench() -> str:
    """benchmarks/owl_smollm2.py: uniform against OWL layer-wise sparsity on SmolLM2-135M."""
    source = "benchmarks/results/owl_smollm2.json"
    data = _load(source)
    dense = next(r for r in data["rows"] if r["method"] == "dense")
    rows = {(r["method"], r["ratio"], r["profile"]): r for r in data["rows"] if r["method"] != "dense"}
    lines = ["| method | target | uniform: perplexity | OWL: perplexity | OWL: overall sparsity | OWL block ratios | OWL statistics pass | pruning pass (OWL run) |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, ratio, profile), owl in sorted(rows.items()):
        if profile != "owl" or (method, ratio, "uniform") not in rows:
            continue
        uniform = rows[(method, ratio, "uniform")]
        ratios = list(owl["block_ratios"].values())
        lines.append(f"| {method} | {ratio:.0%} | {uniform['perplexity']:.1f} | {owl['perplexity']:.1f} | {owl['sparsity']:.4%} "
                     f"| {min(ratios):.3f} - {max(ratios):.3f} | {owl['statistics_seconds']:.0f} s | {owl['prune_seconds']:.0f} s |")
    setup = (f"SmolLM2-135M, dense {dense['perplexity']:.2f}; 128 x 128 calibration tokens of Tiny Shakespeare; perplexity "
             "on WikiText-2 raw test, first 12 windows of 512 tokens; OWL with M = 5, lambda = 0.08. Times on two shared "
             "cores: compare the statistics pass only with the pruning pass of its own row.")
    runs = [dict(r, machine=dict(r["machine"], threads=r["settings"].get("threads"))) for r in data["runs"]]
    return "\n".join(lines) + f"\n\n{setup}\n\n" + _bench_caption(runs)


def render(table_id: str) -> str:
    kind, _, arg = table_id.partition(":")
    renderers = {"results": lambda: results_table(arg), "gap": lambda: gap_table(arg),
                 "gap-readme": lambda: gap_table(arg, readme=True), "distill": lambda: distill_pairs(arg),
                 "curve": lambda: curve_table(arg), "profile-table": lambda: profile_table(arg),
                 "profile-readme": lambda: profile_table(arg, readme=True), "h100-prune": h100_prune, "h100-recover": h100_recover,
                 "config-reference": reference_markdown,
                 "blockwise-bench": blockwise_bench, "owl-bench": owl_bench,
                 "prune-reconstruct": prune_reconstruct}
    if kind not in renderers:
        raise KeyError(f"unknown table id {table_id!r}; renderers: {', '.join(renderers)}")
    return renderers[kind]()


def marked_files() -> list[Path]:
    paths = {p for pattern in FILES for p in ROOT.glob(pattern)}
    return sorted(p for p in paths if "<!-- table:" in p.read_text())


def render_text(text: str, page: str) -> str:
    PAGE[0] = page
    return MARKER.sub(lambda m: m.group(1) + _body(m.group("id")) + m.group(4), text)


def _body(table_id: str) -> str:
    return "\n" + render(table_id) + "\n"


def differences() -> list[str]:
    """``file: table ID`` for every marked table whose committed text is not what its source renders."""
    out = []
    for path in marked_files():
        PAGE[0] = str(path.relative_to(ROOT))
        for match in MARKER.finditer(path.read_text()):
            if match.group("body") != _body(match.group("id")):
                out.append(f"{path.relative_to(ROOT)}: table {match.group('id')}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report differing tables instead of rewriting them")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        for line in stale:
            print(f"stale: {line}")
        return 1 if stale else 0
    for path in marked_files():
        text = path.read_text()
        new = render_text(text, str(path.relative_to(ROOT)))
        if new != text:
            path.write_text(new)
            print(f"rendered {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
