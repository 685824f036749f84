"""What a GPU measurement ran on: commit, GPU, driver, library versions, and the card's measured ceilings.

    python benchmarks/gpu_env.py --commit HASH --json env.json   # ~5 s on a GPU; versions only on CPU

Records the versions of every package the benchmarks use or can use (absent ones as null: e.g.
bitsandbytes, liger_kernel), CUDA / cuDNN / cuSPARSELt versions, the GPU's name, compute capability
and memory, and three ceilings measured here (``benchmarks/gpu_check.sh`` runs it first): an
8192^3 bf16 matmul (TFLOP/s), a device-to-device copy (GB/s, bytes read + written) and host-to-device
copies from pinned and from pageable memory (GB/s; what ``--compute_device`` streaming pays).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import time

PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "bitsandbytes", "liger-kernel",
            "triton", "lm-eval", "numpy", "pytest"]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                               "--format=csv"], capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ceilings(torch) -> dict:
    """Measured: bf16 matmul TFLOP/s, device copy GB/s, host-to-device GB/s (pinned, pageable)."""
    device = torch.device("cuda")
    result = {}

    def timed(fn, repeats: int) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    result["bf16_matmul_tflops"] = 2 * size**3 / timed(lambda: torch.mm(a, b), 10) / 1e12
    a = b = None  # free before the 1 GiB buffers
    source = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB
    target = torch.empty_like(source)
    result["device_copy_gb_s"] = 2 * source.numel() / timed(lambda: target.copy_(source), 10) / 1e9
    target = None
    pinned = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(source.numel(), dtype=torch.uint8)
    result["host_to_device_pinned_gb_s"] = source.numel() / timed(lambda: source.copy_(pinned, non_blocking=True), 5) / 1e9
    result["host_to_device_pageable_gb_s"] = source.numel() / timed(lambda: source.copy_(pageable), 3) / 1e9
    result["device_to_host_pageable_gb_s"] = source.numel() / timed(lambda: pageable.copy_(source), 3) / 1e9
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="unknown", help="the commit measured (gpu_check.sh: git rev-parse HEAD or $COMMIT)")
    parser.add_argument("--no_ceilings", action="store_true", help="skip the measured ceilings")
    parser.add_argument("--json", default=None, help="write here (also printed)")
    args = parser.parse_args(argv)
    info = {"commit": args.commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0], "platform": platform.platform(), "packages": {p: version(p) for p in PACKAGES},
            "nvidia_smi": nvidia_smi()}
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cusparselt=getattr(torch.backends.cusparselt, "version", lambda: None)())
        if not args.no_ceilings:
            info["ceilings"] = ceilings(torch)
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
