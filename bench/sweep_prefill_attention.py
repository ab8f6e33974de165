"""Tile-shape sweep of the paged prefill attention kernel against torch SDPA, on one GPU.

    python -m bench.sweep_prefill_attention [--out bench/results/sweep_prefill_attention-<gpu>.json]

For each prefill length of bench/gpu_kernels.py, with its shapes (one sequence, 32 heads of 128, bf16, K/V in
16-token blocks scattered at random), times torch SDPA (causal, contiguous K/V) and then the Triton kernel
under every TileConfig in CANDIDATES (tile shapes and structural variants). Each candidate's output is
checked once against SDPA's, at the bf16 tolerance of the kernel tests, before it is timed. A candidate that
fails to compile or launch (out of shared memory, say) or answers wrongly is recorded as such and the sweep
goes on. Prints a table per length and writes every row as JSON; "best" is the candidate with the highest
worst-case fraction of SDPA.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.gpu_kernels import (
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_Q_HEADS,
    PREFILL_LENGTHS,
    PrefillInputs,
    causal_flops,
    median_s,
    prefill_inputs,
)
from bench.results import RESULTS_DIR, result_header
from diptych.kernels.prefill_attention import TileConfig, default_tile_config

# Shapes the sm_90 build (Triton 3.6) takes within 227 KB of shared memory, plain and with the structural
# variants of TileConfig. Registers / shared memory per program from an sm_90 AOT build: 128x128 s3 255 /
# 224 KB (lazy 254 / 225 KB, paired 255 + 28 B spilled), 128x64 s3 180 / 128 KB (lazy 194, paired 188),
# 64x64 w4 s3 208 / 112 KB (two programs per SM; lazy 214), 128x64 s2 with max_registers=128: 128 + 100 B
# spilled / 96 KB (two programs per SM). First H200 run (L4096 / L16384 of SDPA): paired 128x128 s3
# 0.72 / 0.79 and 64x64 w4 s3 0.76 / 0.72 (plain 0.70 / 0.79 and 0.72 / 0.72); 128x64 s2 r128 0.70 / 0.76;
# lazy rescaling lost 0.03-0.17 everywhere (its branch costs more than the multiplies it skips).
_LAZY, _PAIRED = {"lazy_rescale": True}, {"paired": True}
CANDIDATES = (
    TileConfig(128, 128, 8, 3),
    TileConfig(128, 128, 8, 3, **_LAZY),
    TileConfig(128, 128, 8, 3, **_PAIRED),
    TileConfig(128, 128, 8, 2, **_PAIRED),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 64, 8, 3, **_LAZY),
    TileConfig(128, 64, 8, 3, **_PAIRED),
    TileConfig(128, 64, 8, 4, **_PAIRED),
    TileConfig(128, 64, 8, 2, max_registers=128),
    TileConfig(128, 64, 8, 2, **_PAIRED, max_registers=128),
    TileConfig(64, 64, 4, 3),
    TileConfig(64, 64, 4, 3, **_LAZY),
    TileConfig(64, 64, 4, 3, **_PAIRED),
    TileConfig(64, 32, 4, 4, **_PAIRED),
    TileConfig(64, 128, 4, 2, **_PAIRED),
)
ATOL = RTOL = 2e-2  # bf16, as tests/kernels/helpers.py holds the kernel to
DEFAULT_OUT = RESULTS_DIR / "sweep_prefill_attention.json"  # run_gpu.sh names it per GPU


@dataclass(frozen=True)
class Outcome:
    length: int
    config: TileConfig
    tflops: float | None  # None when the candidate failed or answered wrongly
    fraction: float | None  # of SDPA's TFLOP/s at the same length
    max_diff: float | None
    compile_s: float  # first call: compile (or cache load) and one run
    error: str = ""


def tflops(length: int, seconds: float) -> float:
    return causal_flops(length) / seconds / 1e12


def try_candidate(
    case: PrefillInputs, config: TileConfig, expected: torch.Tensor, sdpa_rate: float
) -> Outcome:
    run = case.ours(config)
    started = time.perf_counter()
    try:
        out = run()
        torch.cuda.synchronize()
    except Exception as error:  # compile or launch failure (e.g. out of shared memory): record it, go on
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
        message = f"{type(error).__name__}: {lines[-1].strip()}"[:300]  # the last line says what failed
        return Outcome(case.length, config, None, None, None, time.perf_counter() - started, message)
    compile_s = time.perf_counter() - started
    max_diff = (out.float() - expected).abs().max().item()
    if not torch.allclose(out.float(), expected, atol=ATOL, rtol=RTOL):
        return Outcome(case.length, config, None, None, max_diff, compile_s, "wrong answer")
    rate = tflops(case.length, median_s(run))
    return Outcome(case.length, config, rate, rate / sdpa_rate, max_diff, compile_s)


def label(config: TileConfig) -> str:
    flags = [name for name, on in (("lazy", config.lazy_rescale), ("paired", config.paired)) if on]
    if config.max_registers is not None:
        flags.append(f"r{config.max_registers}")
    return " ".join([f"M{config.block_m} N{config.block_n} w{config.num_warps} s{config.num_stages}", *flags])


def format_table(length: int, sdpa_rate: float, outcomes: list[Outcome], default: TileConfig) -> str:
    lines = [
        f"prefill L={length}: torch SDPA {sdpa_rate:.1f} TFLOP/s",
        f"{'config':<36} {'TFLOP/s':>8} {'of SDPA':>8} {'max|diff|':>10} {'compile s':>9}  note",
    ]
    ranked = sorted(outcomes, key=lambda o: -1.0 if o.tflops is None else o.tflops, reverse=True)
    for o in ranked:
        rate = f"{o.tflops:8.1f}" if o.tflops is not None else " " * 8
        fraction = f"{o.fraction:8.3f}" if o.fraction is not None else " " * 8
        diff = f"{o.max_diff:10.1e}" if o.max_diff is not None else " " * 10
        note = o.error or ("default" if o.config == default else "")
        lines.append(f"{label(o.config):<36} {rate} {fraction} {diff} {o.compile_s:9.1f}  {note}")
    return "\n".join(lines)


def best(outcomes: list[Outcome]) -> TileConfig | None:
    """The candidate whose worst fraction of SDPA over the lengths is highest; it must pass at all of them."""
    worst: dict[TileConfig, float] = {}
    failed = {o.config for o in outcomes if o.fraction is None}
    for o in outcomes:
        if o.fraction is not None and o.config not in failed:
            worst[o.config] = min(worst.get(o.config, o.fraction), o.fraction)
    return max(worst, key=lambda c: worst[c]) if worst else None


def sweep_case(case: PrefillInputs, default: TileConfig) -> tuple[float, list[Outcome]]:
    expected = case.sdpa()[0].transpose(0, 1).float()
    sdpa_rate = tflops(case.length, median_s(case.sdpa))
    outcomes = []
    for config in CANDIDATES:
        outcomes.append(try_candidate(case, config, expected, sdpa_rate))
        print(f"  L={case.length} {label(config)}: {outcomes[-1].tflops or outcomes[-1].error}", flush=True)
    print(format_table(case.length, sdpa_rate, outcomes, default), flush=True)
    return sdpa_rate, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the sweep times CUDA kernels: no CUDA device here")
    torch.manual_seed(0)
    started = time.perf_counter()
    sdpa: dict[int, float] = {}
    outcomes: list[Outcome] = []
    for length in PREFILL_LENGTHS:
        case = prefill_inputs(length)
        default = default_tile_config(case.q)
        sdpa[length], rows = sweep_case(case, default)
        outcomes.extend(rows)
        del case
        torch.cuda.empty_cache()
    winner = best(outcomes)
    doc = {
        **result_header(),
        "shape": f"1 sequence, {NUM_Q_HEADS} heads x {HEAD_DIM}, {DTYPE}, KV blocks of {BLOCK_SIZE}, causal",
        "sdpa_tflops": {str(length): rate for length, rate in sdpa.items()},
        "default": asdict(default),
        "best": asdict(winner) if winner else None,
        "rows": [{**asdict(o), "label": label(o.config)} for o in outcomes],
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"best: {label(winner) if winner else 'none passed'}; wrote {args.out} in {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
