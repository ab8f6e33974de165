"""Hardware ceilings measured in the same run as a benchmark (HBM copy bandwidth, bf16 matmul rate), and
the note that says how a row fares against its target."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from bench.results import Row


def copy_bandwidth(device: str = "cuda:0", nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second of a device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def start_gpu_sweep() -> float:
    """What a kernel sweep does first: refuse to run without CUDA, seed, and measure (and print) the copy
    bandwidth its rows are read against."""
    if not torch.cuda.is_available():
        raise SystemExit("the sweep times CUDA kernels: no CUDA device here")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    return bandwidth


def matmul_rate(device: str = "cuda:0", n: int = 8192) -> float:
    """bf16 FLOP/s of an n x n x n torch matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def against_target(row: Row, target: float) -> Row:
    """The row with a note saying whether its fraction of the ceiling reaches the target, or by how much
    it falls short."""
    fraction = row.fraction
    if fraction is None:
        verdict = f"target {target:g}: no ceiling to judge against"
    elif fraction >= target:
        verdict = f"target {target:g}: met"
    else:
        verdict = f"target {target:g}: missed by {target - fraction:.2f} ({fraction / target:.0%} of target)"
    return replace(row, note=f"{row.note}; {verdict}" if row.note else verdict)
