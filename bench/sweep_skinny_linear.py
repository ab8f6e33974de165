"""Decode-sized linear layers on one GPU: cuBLAS (torch F.linear) against kernels/skinny_linear.py's launch
shapes, per Llama-3-8B layer shape and row count, as weight bytes read per second against the copy bandwidth.

    python -m bench.sweep_skinny_linear [--out FILE] [--rows 1 2 4 8 16]

Times are CUDA-graph replays (the decode step runs from graphs) of calls that cycle through copies of the
weight spanning 4x the L2, so each call reads its weight from HBM as a decode step does. `gate_up+silu`
compares the fused kernel with cuBLAS followed by kernels.silu_and_mul. A profiling aid for choosing
Linear's GPU path: it prints a table per case and writes the whole sweep as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton.testing

from bench.ceilings import start_gpu_sweep
from bench.gpu_kernels import num_copies, rotating
from bench.results import RESULTS_DIR, result_header
from diptych.kernels.activation import silu_and_mul_triton
from diptych.kernels.skinny_linear import SkinnyConfig, default_skinny_config, skinny_linear_triton

DTYPE = torch.bfloat16
# (name, out_features, in_features, fuse_silu): Llama-3-8B's projections and LM head.
LAYERS = (
    ("qkv", 6144, 4096, False),
    ("o", 4096, 4096, False),
    ("gate_up", 28672, 4096, False),
    ("gate_up+silu", 28672, 4096, True),
    ("down", 4096, 14336, False),
    ("lm_head", 128256, 4096, False),
)
CUDA_CORE_CANDIDATES = tuple(
    SkinnyConfig(n, k, w, s)
    for n, k, w, s in (
        (4, 512, 4, 1),
        (4, 1024, 4, 1),
        (8, 256, 4, 1),
        (8, 512, 4, 1),
        (8, 1024, 4, 1),
        (8, 512, 8, 1),
        (8, 512, 4, 3),
        (16, 256, 4, 1),
        (16, 512, 4, 1),
        (16, 512, 8, 1),
        (32, 256, 8, 1),
        (4, 2048, 4, 1),
        (8, 1024, 8, 1),
        (8, 2048, 8, 1),
        (16, 1024, 8, 1),
        (4, 1024, 2, 1),
    )
)
MAX_CUDA_CORE_ROWS = 4  # beyond, a [rows, N, K] product per tile no longer fits in registers
TENSOR_CORE_CANDIDATES = tuple(
    SkinnyConfig(n, k, 4, s, use_dot=True)
    for n, k, s in (
        (16, 128, 4),
        (16, 256, 4),
        (32, 128, 4),
        (32, 256, 3),
        (64, 128, 4),
        (32, 64, 6),
        (64, 64, 6),
    )
)
GRAPH_REP_MS = 10
DEFAULT_OUT = RESULTS_DIR / "sweep_skinny_linear.json"


@dataclass(frozen=True)
class Outcome:
    layer: str
    rows: int
    system: str  # "cublas" or the candidate's label
    gbps: float | None  # weight bytes read per second; None when it failed or answered wrongly
    fraction: float | None  # of the copy bandwidth
    max_diff: float | None
    error: str = ""


def label(config: SkinnyConfig) -> str:
    kind = "tc" if config.use_dot else "cc"
    return f"{kind} N{config.block_n} K{config.block_k} w{config.num_warps} s{config.num_stages}"


def graphed_s(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median") / 1e3


Maker = Callable[[torch.Tensor], Callable[[], torch.Tensor]]  # weight -> a call on it


def systems(x: torch.Tensor, fuse_silu: bool) -> list[tuple[str, Maker]]:
    """cuBLAS (and the separate SwiGLU kernel when fused) and each candidate launch shape for x's rows."""

    def cublas(weight: torch.Tensor) -> Callable[[], torch.Tensor]:
        if fuse_silu:
            return lambda: silu_and_mul_triton(F.linear(x, weight))
        return lambda: F.linear(x, weight)

    def skinny(config: SkinnyConfig) -> Maker:
        return lambda weight: lambda: skinny_linear_triton(x, weight, None, fuse_silu, config)

    cuda_core = CUDA_CORE_CANDIDATES if x.shape[0] <= MAX_CUDA_CORE_ROWS else ()
    candidates = list(cuda_core) + list(TENSOR_CORE_CANDIDATES)
    return [("cublas", cublas)] + [(label(config), skinny(config)) for config in candidates]


def sweep_layer(name: str, out_features: int, in_features: int, fuse_silu: bool, rows_list: list[int],
                bandwidth: float) -> list[Outcome]:  # fmt: skip
    weight_bytes = out_features * in_features * DTYPE.itemsize
    weights = [
        torch.randn(out_features, in_features, dtype=DTYPE, device="cuda") * in_features**-0.5
        for _ in range(num_copies(weight_bytes))
    ]
    outcomes = []
    for rows in rows_list:
        x = torch.randn(rows, in_features, dtype=DTYPE, device="cuda")
        contenders = systems(x, fuse_silu)
        expected = contenders[0][1](weights[0])().float()
        tolerance = 2e-2 * expected.abs().max().item() + 1e-2
        for system, make in contenders:
            try:
                diff = (make(weights[0])().float() - expected).abs().max().item()
                if diff > tolerance:
                    outcomes.append(Outcome(name, rows, system, None, None, diff, "wrong answer"))
                    continue
                seconds = graphed_s(rotating([make(w) for w in weights]))
            except Exception as error:  # a launch shape that does not compile: note it, go on
                outcomes.append(Outcome(name, rows, system, None, None, None, f"{type(error).__name__}"))
                continue
            gbps = weight_bytes / seconds
            outcomes.append(Outcome(name, rows, system, gbps / 1e9, gbps / bandwidth, diff))
        print(format_table(name, rows, [o for o in outcomes if o.rows == rows], fuse_silu), flush=True)
    return outcomes


def format_table(name: str, rows: int, outcomes: list[Outcome], fuse_silu: bool) -> str:
    default = label(default_skinny_config(rows, fuse_silu))
    ranked = sorted(outcomes, key=lambda o: o.fraction or -1.0, reverse=True)
    lines = [f"{name} rows={rows}: {'system':<22} {'GB/s':>7} {'of copy':>7}"]
    for o in ranked[:6] + [o for o in ranked[6:] if o.system in ("cublas", default)]:
        mark = " (default)" if o.system == default else ""
        figures = f"{o.gbps:7.0f} {o.fraction:7.3f}" if o.gbps else f"{'':7} {'':7} {o.error}"
        lines.append(f"{'':>{len(name) + 9}} {o.system:<22} {figures}{mark}")
    return "\n".join(lines)


def document(outcomes: list[Outcome], bandwidth: float, wall_s: float) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        key = f"{o.layer}@{o.rows}"
        if o.fraction is None:
            continue
        entry = best.setdefault(key, {"cublas": None, "best": None, "best_fraction": 0.0})
        if o.system == "cublas":
            entry["cublas"] = o.fraction
        elif o.fraction > entry["best_fraction"]:
            entry.update(best=o.system, best_fraction=o.fraction)
    return {
        **result_header(),
        "dtype": str(DTYPE),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "summary": best,
        "rows": [asdict(o) for o in outcomes],
        "wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--layers", nargs="+", default=[layer[0] for layer in LAYERS])
    args = parser.parse_args()
    started = time.perf_counter()
    bandwidth = start_gpu_sweep()
    outcomes: list[Outcome] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, out_features, in_features, fuse_silu in LAYERS:
        if name not in args.layers:
            continue
        outcomes.extend(sweep_layer(name, out_features, in_features, fuse_silu, args.rows, bandwidth))
        torch.cuda.empty_cache()
        doc = document(outcomes, bandwidth, time.perf_counter() - started)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for key, entry in document(outcomes, bandwidth, 0.0)["summary"].items():
        print(
            f"{key:<18} cublas {entry['cublas'] or 0:.3f}  best {entry['best']} {entry['best_fraction']:.3f}"
        )


if __name__ == "__main__":
    main()
