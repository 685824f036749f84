"""benchmarks/speed_tables.py on a made-up gpu_check.sh results folder: targets marked met / not met, commit named."""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed_tables.py"


@pytest.fixture(scope="module")
def speed_tables():
    spec = importlib.util.spec_from_file_location("speed_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checks(method, blocks=32, beyond=0, ratio=0.9):
    layers = 2 * blocks
    if method == "wanda":
        return {"blocks_checked": blocks, "layers_checked": layers, "all_structures_ok": True, "seconds": 9.0,
                "all_masks_equal_formula": beyond == 0, "mask_mismatches": beyond + 3, "mismatches_beyond_rounding": beyond,
                "layers": []}
    return {"blocks_checked": blocks, "layers_checked": layers, "all_structures_ok": True, "seconds": 12.0,
            "max_error_ratio_vs_magnitude": ratio, "mean_error_ratio_vs_magnitude": ratio - 0.1,
            "all_below_magnitude": ratio < 1, "gram_rows": 32768, "layers": []}


def _prune_result(method, schedule, seconds, pass_seconds, peak, blocks=32, **extra):
    result = {"method": method, "schedule": schedule, "seconds": seconds, "blocks_built": blocks,
              "per_block_seconds": seconds / blocks, "calibration_pass_seconds": pass_seconds,
              "ratio_to_one_pass": seconds / pass_seconds, "ratio_to_two_passes": seconds / pass_seconds / 2,
              "peak_memory_gib": peak, "sparsity": 0.5, "blocks": []}
    result.update(extra)
    return result


def _prune(results, **extra):
    payload = {"device": "NVIDIA H200", "model": "random", "dtype": "torch.float16", "nsamples": 128, "seqlen": 2048,
               "batch_size": 8, "sparsity_ratio": 0.5, "sparsity_type": "unstructured", "full_depth": 32,
               "layers_built": 32, "model_gib": 12.6, "results": results, "skipped": [], "complete": True}
    payload.update(extra)
    return payload


def _recover_row(case, method, batch, step_seconds, peak, **extra):
    tokens = batch * 1024 / step_seconds
    row = {"case": case, "method": method, "micro_batch": batch, "tokens_per_second": tokens, "step_seconds": step_seconds,
           "peak_memory_gib": peak, "mfu": tokens * 41.25e9 / 989.4e12, "work_utilization": tokens * 28e9 / 989.4e12}
    row.update(extra)
    return row


@pytest.fixture()
def results(tmp_path):
    """A results folder as gpu_check.sh writes it: Wanda sequential misses its target, everything else meets its own."""
    folder = tmp_path / "h200_20261129_abcdef1"
    folder.mkdir()
    write = lambda name, data: (folder / name).write_text(json.dumps(data))  # noqa: E731
    write("env.json", {"commit": "abcdef1234567890", "date": "2026-11-29 10:00 UTC", "gpu": "NVIDIA H200", "cuda": "13.0",
                       "packages": {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0"},
                       "ceilings": {"bf16_matmul_tflops": 788.0, "device_copy_gb_s": 4300.0,
                                    "host_to_device_pinned_gb_s": 50.0, "host_to_device_pageable_gb_s": 12.0}})
    write("prune_bench.json", _prune([
        _prune_result("wanda", "sequential", 9.6, 8.0, 25.1, checks=_checks("wanda")),  # 1.20 x: not met
        _prune_result("wanda", "parallel", 14.4, 8.0, 16.0, checks=_checks("wanda")),  # 1.80 x: met
        _prune_result("sparsegpt", "sequential", 12.0, 8.0, 26.0, floor_seconds=10.0, ratio_to_floor=1.2,
                      checks=_checks("sparsegpt")),
        _prune_result("sparsegpt", "parallel", 20.0, 8.0, 17.0, floor_seconds=10.0, ratio_to_floor=2.0,
                      checks=_checks("sparsegpt")),
    ], hessian_inverse={"per_block": 0.0625}))
    write("prune_bench_stream.json", _prune([
        _prune_result("wanda", "sequential", 6.0, 5.0, 3.1, blocks=16, extrapolated_seconds_full_depth=11.5),  # 1.20 x resident
        _prune_result("wanda", "parallel", 10.0, 5.0, 2.9, blocks=16, extrapolated_seconds_full_depth=20.0),  # 1.39 x: not met
    ], layers_built=16, stream_blocks=True))
    write("recover_throughput.json", {
        "device": "NVIDIA H200", "case": {"dtype": "bfloat16", "block": 1024, "warmup": 2, "steps": 4},
        "flops": {"model_flops_per_token": 41.25e9, "formula": "6 N + 12 L d T"}, "peak_tflops": 989.4,
        "peak_source": "datasheet dense bf16 for H200", "measured_matmul_tflops": 790.0, "fused_loss": "liger",
        "attention_implementation": "sdpa", "best_micro_batch": 16, "rows": [
            _recover_row("lora q/v r8 (sweep)", "lora", 8, 0.60, 53.0, sweep=True),
            _recover_row("lora q/v r8 (sweep)", "lora", 16, 1.15, 95.0, sweep=True, best_micro_batch=True),
            {"case": "lora q/v r8 (sweep)", "method": "lora", "micro_batch": 24, "error": "out of memory: ...",
             "out_of_memory": True},
            _recover_row("masked_lora q/v r8", "masked_lora", 16, 1.19, 93.0),  # +3.5%: met
            _recover_row("lora all-linear r8", "lora", 16, 1.30, 99.0),
            _recover_row("masked_lora all-linear r8", "masked_lora", 16, 1.50, 110.0),  # +15.4%: not met
            _recover_row("plain Trainer, full fine-tuning", "full", 4, 0.50, 80.0, reference=True),
            _recover_row("full (masked full fine-tuning)", "full", 4, 0.51, 86.0),  # +2%: met
            {"case": "lora q/v r8, torch.compile blocks", "method": "lora", "micro_batch": 16,
             "skipped": "about 70 s needed, 20 s left"},
        ]})
    write("semi_structured_bench.json", {
        "device": "NVIDIA H200", "backends": ["cusparselt"], "skipped": None, "layers_correct": True,
        "block_linears": [
            {"tokens": 4096, "layout": "prefill", "impl": "dense", "graph_tokens_per_second": 50000.0},
            {"tokens": 4096, "layout": "prefill", "impl": "cusparselt", "graph_tokens_per_second": 60000.0, "graph_speedup": 1.2},
        ],
        "model": [{"impl": "cusparselt", "tokens": 4096, "layout": "prefill", "eager_speedup": 1.1}],
        "verdict": {"threshold": 0.05, "block_linears_faster_at": ["cusparselt prefill 4096 tokens: 1.20x"],
                    "model_faster_at": [], "faster_anywhere": True}})
    (folder / "gpu_tests.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="9" failures="1" '
                                          'errors="0" skipped="2"></testsuite></testsuites>')
    (folder / "sections.tsv").write_text("section\trc\tseconds\ttimeout\nprune\t0\t170\t185\nrecover\t124\t125\t125\n")
    return folder


def _targets(markdown: str) -> dict[str, str]:
    """target label -> status, from the targets table."""
    rows = {}
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("| target |"):
            in_table = True
            continue
        if in_table and line.startswith("|---"):
            continue
        if in_table and line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[3]
        elif in_table:
            break
    return rows


def test_targets_are_marked_met_or_not_met_with_the_commit(speed_tables, results):
    markdown = speed_tables.render(results)
    assert "commit `abcdef123456`" in markdown and "NVIDIA H200" in markdown
    targets = _targets(markdown)
    assert targets["1. Wanda `--true_sequential` / one calibration pass"] == "**not met**"
    assert targets["1. Wanda, papers' schedule / one calibration pass"] == "met"
    assert targets["1. Wanda sequential, `--compute_device cuda` / resident"] == "met"  # 11.5 / 9.6 = 1.20
    assert targets["1. Wanda parallel, `--compute_device cuda` / resident"] == "**not met**"  # 20 / 14.4 = 1.39
    assert targets["1. Wanda masks = float64 formula, first + last linear of every block"] == "met"
    assert targets["2. SparseGPT `--true_sequential` / (one pass + Hessian inverses)"] == "met"
    assert targets["2. SparseGPT error below magnitude's, first + last linear of every block"] == "met"
    assert targets["3. `lora` q/v r8 MFU at the best micro-batch"] == "met"  # 14,247 tok/s x 41.25 GFLOP = 59%
    assert targets["3. `masked_lora` q/v vs `lora` q/v"] == "met"
    assert targets["3. `masked_lora` all linear vs `lora` all linear"] == "**not met**"
    assert targets["3. `full` vs a plain Trainer"] == "met"
    assert targets["4. 2:4 (cuSPARSELt / CUTLASS) faster than dense fp16"] == "reported"
    assert "1.20 x (9.6 s / 8.0 s)" in markdown  # the figure beside the status
    assert "faster at: cusparselt prefill 4096 tokens" in markdown
    assert "6 passed, 1 failed" in markdown and "recover timed out after 125 s" in markdown
    assert "out of memory" in markdown and "skipped: about 70 s needed" in markdown


def test_missing_files_are_not_measured_and_a_bad_check_is_not_met(speed_tables, results):
    (results / "recover_throughput.json").unlink()
    (results / "prune_bench_stream.json").unlink()
    prune = json.loads((results / "prune_bench.json").read_text())
    prune["results"][1]["checks"] = _checks("wanda", beyond=5)  # parallel: 5 mismatches beyond rounding
    prune["results"][3]["checks"] = _checks("sparsegpt", blocks=2)  # only 2 of 32 blocks checked
    (results / "prune_bench.json").write_text(json.dumps(prune))
    targets = _targets(speed_tables.render(results))
    assert targets["3. `lora` q/v r8 MFU at the best micro-batch"] == "*not measured*"
    assert targets["3. `full` vs a plain Trainer"] == "*not measured*"
    assert targets["1. Wanda sequential, `--compute_device cuda` / resident"] == "*not measured*"
    assert targets["1. Wanda masks = float64 formula, first + last linear of every block"] == "**not met**"
    assert targets["2. SparseGPT error below magnitude's, first + last linear of every block"] == "**not met**"


def test_reads_the_archive_the_device_returns(speed_tables, results, tmp_path):
    archive = tmp_path / f"{results.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(results, arcname=results.name)
    assert speed_tables.render(archive) == speed_tables.render(results)
    assert f"benchmarks/results/{results.name}/" in speed_tables.render(archive)


def test_a_skipped_2_4_run_says_why(speed_tables, results):
    (results / "semi_structured_bench.json").write_text(json.dumps(
        {"device": "cpu", "backends": [], "skipped": "no CUDA device: torch's semi-structured sparse tensors are CUDA-only"}))
    markdown = speed_tables.render(results)
    assert _targets(markdown)["4. 2:4 (cuSPARSELt / CUTLASS) faster than dense fp16"] == "*not measured*"
    assert "skipped: no CUDA device" in markdown
