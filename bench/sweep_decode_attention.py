"""Launch-shape sweep of the paged decode attention kernel against the HBM copy bandwidth, on one GPU.

    python -m bench.sweep_decode_attention [--out bench/results/sweep_decode_attention.json]

For each (batch, context) of SHAPES, with bench/gpu_kernels.py's decode inputs (32 query / 8 KV heads of 128,
bf16, K/V in 16-token blocks scattered at random, copies spanning 4x the L2 so every call reads HBM), runs
the Triton kernel under every DecodeTileConfig in CANDIDATES. Each candidate's output and LSE are checked
once against the torch reference, at the bf16 tolerance of the kernel tests, before it is timed. A candidate
that fails to compile or launch (out of shared memory, say) or answers wrongly is recorded and the sweep goes
on. Each is timed twice, as K+V bytes read per second over the copy bandwidth measured in the same run:
eagerly (triton.testing.do_bench, as bench/gpu_kernels.py times it) and replayed from a CUDA graph (as the
engine runs decode). The eager figure of a short call is the host's launch time, not the kernel's (B1_L8192
and B32_L1024 both took ~0.14 ms on the H200 host), so configs are ranked by the graphed figure. Prints a
table per shape, names the best config at B32_L8192 and the best by worst-case fraction over all shapes,
and writes every row as JSON after each shape (a run cut short still leaves its finished shapes).
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
import triton
import triton.testing

from bench.ceilings import start_gpu_sweep
from bench.gpu_kernels import (
    BLOCK_SIZE,
    DTYPE,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_Q_HEADS,
    DecodeInputs,
    decode_inputs,
    kv_bytes,
    median_s,
    num_copies,
    rotating,
)
from bench.results import RESULTS_DIR, result_header
from diptych.kernels.decode_attention import (
    DecodeTileConfig,
    decode_attention_reference,
    default_decode_config,
    default_num_splits,
)

SHAPES = ((32, 8192), (1, 8192), (32, 1024), (128, 8192))  # (batch, context); the first names the headline
HEADLINE = "B32_L8192"

# From an sm_90 AOT build with Triton 3.6 at these shapes (registers / shared memory per program; none
# spills). Reading the page table in the same iteration as K/V leaves one K/V tile in flight from 2 to 4
# stages (two at 5): 64 w4 s3 110 / 38 KB, s5 128 / 70 KB. table_ahead gives stages - 1 tiles: 64 w4 s3
# 95 / 70 KB, s4 95 / 102 KB; 64 w8 s3 64 / 70 KB, s4 64 / 102 KB; 32 w4 s3 64 / 37 KB, s4 64 / 53 KB, s5
# 64 / 69 KB; 128 w8 s3 80 / 136 KB, s4 80 / 200 KB; 128 w4 s3 168 / 136 KB; (128 w8 s2 80 / 72 KB either
# way; 128 s5 ahead needs 264 KB, over the 227 KB limit). Programs resident an SM, by registers and shared
# memory: 64 w4 s3 (the default) 4, 32 w4 s3 ahead 6, 32 w4 s4 ahead 4, 64 s4 ahead 2, 128 s3/s4 ahead 1,
# the rest 3. At B32_L8192 (256 sequence x KV-head pairs, 132 SMs) programs_per_sm 2 gives 2 splits, 4
# gives 3 and 8 gives 5, so the default's 768 programs run as 1.45 waves of 528; most candidates below
# pair a shape with the split count that fills whole waves (0.97 or 1.94), and a few vary one thing alone.
# B1_L8192 always gets 32 splits (each split keeps at least 256 keys); B128_L8192 1, 1, 2.
_AHEAD = {"table_ahead": True}
CANDIDATES = (
    DecodeTileConfig(64, 4, 3, 4),
    DecodeTileConfig(64, 4, 3, 2),
    DecodeTileConfig(64, 4, 3, 8),
    DecodeTileConfig(64, 4, 5, 4),
    DecodeTileConfig(64, 4, 3, 4, **_AHEAD),
    DecodeTileConfig(64, 4, 3, 2, **_AHEAD),
    DecodeTileConfig(64, 4, 3, 8, **_AHEAD),
    DecodeTileConfig(64, 4, 4, 4, **_AHEAD),
    DecodeTileConfig(64, 4, 4, 2, **_AHEAD),
    DecodeTileConfig(64, 8, 3, 4, **_AHEAD),
    DecodeTileConfig(64, 8, 4, 2, **_AHEAD),
    DecodeTileConfig(32, 4, 3, 4, **_AHEAD),
    DecodeTileConfig(32, 4, 4, 2, **_AHEAD),
    DecodeTileConfig(32, 4, 4, 8, **_AHEAD),
    DecodeTileConfig(32, 4, 5, 4, **_AHEAD),
    DecodeTileConfig(128, 8, 2, 4),
    DecodeTileConfig(128, 8, 3, 4, **_AHEAD),
    DecodeTileConfig(128, 8, 3, 2, **_AHEAD),
    DecodeTileConfig(128, 4, 3, 2, **_AHEAD),
    DecodeTileConfig(128, 8, 4, 2, **_AHEAD),
)
ATOL = RTOL = 2e-2  # bf16, as tests/kernels/helpers.py holds the kernel to
REFERENCE_ROWS = 16  # the reference expands K/V to every query head in fp32: 2 GiB each per 16 rows at L8192
GRAPH_REP_MS = 10  # each graph replay spans about this long; the median of 10 replays is taken
DEFAULT_OUT = RESULTS_DIR / "sweep_decode_attention.json"


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    context: int
    copies: tuple[DecodeInputs, ...]

    @property
    def name(self) -> str:
        return f"B{self.batch}_L{self.context}"

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.batch, self.context)

    def run(self, config: DecodeTileConfig) -> Callable[[], None]:
        """Every copy in turn, so that each call reads its K/V from HBM."""
        return rotating([copy.call(config) for copy in self.copies])


@dataclass(frozen=True)
class Outcome:
    shape: str
    config: DecodeTileConfig
    num_splits: int
    eager_gbps: float | None  # None when the candidate failed or answered wrongly
    eager_fraction: float | None  # of the copy bandwidth
    graphed_gbps: float | None
    graphed_fraction: float | None
    max_diff: float | None  # of out and LSE against the reference
    compile_s: float  # first call: compile (or cache load) and one run
    error: str = ""

    def fraction(self, mode: str) -> float | None:
        return self.graphed_fraction if mode == "graphed" else self.eager_fraction


def make_case(batch: int, context: int) -> DecodeCase:
    copies = tuple(decode_inputs(batch, context) for _ in range(num_copies(kv_bytes(batch, context))))
    return DecodeCase(batch, context, copies)


def reference(inputs: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the torch reference in fp32, REFERENCE_ROWS sequences at a time to bound its memory."""
    outs, lses = [], []
    for start in range(0, inputs.q.shape[0], REFERENCE_ROWS):
        rows = slice(start, start + REFERENCE_ROWS)
        out, lse = decode_attention_reference(
            inputs.q[rows].float(), inputs.k_cache, inputs.v_cache, inputs.kv_lens[rows], inputs.tables[rows],
            HEAD_DIM**-0.5,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def graphed_s(fn: Callable[[], object]) -> float:
    """Seconds a call takes replayed from a CUDA graph: the kernels' time without the host's launch cost."""
    return triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median") / 1e3


def failure(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    return f"{type(error).__name__}: {lines[-1].strip()}"[:300]  # the last line says what failed


def try_candidate(
    case: DecodeCase, config: DecodeTileConfig, expected: tuple[torch.Tensor, torch.Tensor], bandwidth: float
) -> Outcome:
    splits = default_num_splits(
        case.batch, NUM_KV_HEADS, case.context, torch.device("cuda"), config.programs_per_sm
    )
    started = time.perf_counter()
    try:
        out, lse = case.copies[0].call(config)()
        torch.cuda.synchronize()
    except Exception as error:  # compile or launch failure (e.g. out of shared memory): record it, go on
        elapsed = time.perf_counter() - started
        return Outcome(case.name, config, splits, None, None, None, None, None, elapsed, failure(error))
    compile_s = time.perf_counter() - started
    pairs = ((out.float(), expected[0]), (lse, expected[1]))
    max_diff = max((got - want).abs().max().item() for got, want in pairs)
    if not all(torch.allclose(got, want, atol=ATOL, rtol=RTOL) for got, want in pairs):
        return Outcome(case.name, config, splits, None, None, None, None, max_diff, compile_s, "wrong answer")
    run = case.run(config)
    eager = case.kv_bytes / median_s(run)
    graphed, note = None, ""
    try:
        graphed = case.kv_bytes / graphed_s(run)
    except Exception as graph_error:  # a capture failure loses the graphed figure, not the eager one
        note = f"graph: {failure(graph_error)}"
    return Outcome(
        case.name,
        config,
        splits,
        eager / 1e9,
        eager / bandwidth,
        None if graphed is None else graphed / 1e9,
        None if graphed is None else graphed / bandwidth,
        max_diff,
        compile_s,
        note,
    )


def label(config: DecodeTileConfig) -> str:
    ahead = " ahead" if config.table_ahead else ""
    return f"N{config.block_n} w{config.num_warps} s{config.num_stages} p{config.programs_per_sm}{ahead}"


def _cell(value: float | None, spec: str, width: int) -> str:
    return " " * width if value is None else format(value, spec)


def _text(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.3f}"


def format_table(case: DecodeCase, outcomes: list[Outcome], default: DecodeTileConfig) -> str:
    lines = [
        f"decode {case.name}: {case.kv_bytes / 2**20:.0f} MiB of K+V a call, {len(case.copies)} copies",
        f"{'config':<24} {'splits':>6} {'eager GB/s':>10} {'of copy':>7} {'graph GB/s':>10} {'of copy':>7} "
        f"{'max|diff|':>9} {'compile s':>9}  note",
    ]
    ranked = sorted(outcomes, key=lambda o: o.graphed_fraction or o.eager_fraction or -1.0, reverse=True)
    for o in ranked:
        note = o.error or ("default" if o.config == default else "")
        lines.append(
            f"{label(o.config):<24} {o.num_splits:>6} {_cell(o.eager_gbps, '10.0f', 10)} "
            f"{_cell(o.eager_fraction, '7.3f', 7)} {_cell(o.graphed_gbps, '10.0f', 10)} "
            f"{_cell(o.graphed_fraction, '7.3f', 7)} {_cell(o.max_diff, '9.1e', 9)} {o.compile_s:9.1f}"
            f"  {note}"
        )
    return "\n".join(lines)


def best_at(outcomes: list[Outcome], shape: str, mode: str) -> DecodeTileConfig | None:
    """The candidate with the highest fraction of the copy bandwidth at one shape."""
    rated = [(o.fraction(mode), o.config) for o in outcomes if o.shape == shape]
    passed = [(fraction, config) for fraction, config in rated if fraction is not None]
    return max(passed, key=lambda pair: pair[0])[1] if passed else None


def best_worst_case(outcomes: list[Outcome], mode: str) -> DecodeTileConfig | None:
    """The candidate whose lowest fraction over the shapes is highest; it must pass at every shape swept."""
    num_shapes = len({o.shape for o in outcomes})
    fractions: dict[DecodeTileConfig, list[float]] = {}
    for o in outcomes:
        if (fraction := o.fraction(mode)) is not None:
            fractions.setdefault(o.config, []).append(fraction)
    worst = {config: min(fs) for config, fs in fractions.items() if len(fs) == num_shapes}
    return max(worst, key=lambda config: worst[config]) if worst else None


def summary(outcomes: list[Outcome], default: DecodeTileConfig) -> dict[str, dict[str, Any]]:
    """For each timing mode: the best at the headline shape and the best worst case, each with its fractions
    at every shape, next to the default's."""

    def entry(config: DecodeTileConfig | None, mode: str) -> dict[str, Any] | None:
        if config is None:
            return None
        fractions = {o.shape: o.fraction(mode) for o in outcomes if o.config == config}
        return {"label": label(config), "config": asdict(config), "fractions": fractions}

    return {
        mode: {
            f"best_{HEADLINE}": entry(best_at(outcomes, HEADLINE, mode), mode),
            "best_worst_case": entry(best_worst_case(outcomes, mode), mode),
            "default": entry(default, mode),
        }
        for mode in ("graphed", "eager")
    }


def describe(picks: dict[str, Any]) -> str:
    def one(key: str) -> str:
        pick = picks[key]
        if pick is None:
            return "none passed"
        fractions = pick["fractions"]
        worst = min((f for f in fractions.values() if f is not None), default=None)
        return f"{pick['label']} ({_text(fractions.get(HEADLINE))} at {HEADLINE}, worst {_text(worst)})"

    return f"best at {HEADLINE}: {one(f'best_{HEADLINE}')}; best worst case: {one('best_worst_case')}"


def sweep_case(case: DecodeCase, default: DecodeTileConfig, bandwidth: float) -> list[Outcome]:
    expected = reference(case.copies[0])
    outcomes = []
    for config in CANDIDATES:
        outcomes.append(try_candidate(case, config, expected, bandwidth))
        o = outcomes[-1]
        figures = f"eager {_text(o.eager_fraction)}, graphed {_text(o.graphed_fraction)} of copy"
        print(f"  {case.name} {label(config)}: {figures} {o.error}", flush=True)
    print(format_table(case, outcomes, default), flush=True)
    return outcomes


def document(
    outcomes: list[Outcome], default: DecodeTileConfig, bandwidth: float, wall_s: float
) -> dict[str, Any]:
    return {
        **result_header(),
        "shape": f"{NUM_Q_HEADS} q / {NUM_KV_HEADS} kv heads x {HEAD_DIM}, {DTYPE}, blocks of {BLOCK_SIZE}",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "summary": summary(outcomes, default),
        "rows": [{**asdict(o), "label": label(o.config)} for o in outcomes],
        "wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args()
    started = time.perf_counter()
    bandwidth = start_gpu_sweep()
    default = default_decode_config(torch.empty(1, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"))
    outcomes: list[Outcome] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for batch, context in SHAPES:
        case = make_case(batch, context)
        outcomes.extend(sweep_case(case, default, bandwidth))
        del case
        torch.cuda.empty_cache()
        doc = document(outcomes, default, bandwidth, time.perf_counter() - started)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")  # after every shape: a cut-short run keeps them
    for mode, picks in summary(outcomes, default).items():
        print(f"{mode}: {describe(picks)}")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
