"""The ceiling of plain Triton 3.6 on Hopper for causal prefill attention, as a fraction of torch SDPA: how
much of the prefill kernel's target (0.90 of SDPA, bench/gpu_kernels.py) Triton can reach at all.

    python -m bench.triton_attention_ceiling                 # GPU: every variant x shape at L 4096, 16384
    python -m bench.triton_attention_ceiling --variants ptr,tma_dev --lengths 4096 --out /tmp/ceiling.json
    python -m bench.triton_attention_ceiling --smoke         # CPU interpreter, fp32, [2, 256, 64]
    python -m bench.triton_attention_ceiling --compile-only  # CPU: build every variant x shape for sm_90

The easiest case there is (batch 1, contiguous K/V, [32, L, 128] bf16 seen as one [H * L, D] matrix): what
it misses of SDPA a paged kernel cannot make up. Variants: ptr (pointer loads), tma_host (host
TensorDescriptor), tma_dev (tl.make_tensor_descriptor), each with two key loops (unmasked tiles, then the
masked diagonal); *_1loop: one loop, every tile masked; *_ws: tl.range(..., warp_specialize=True). Each case
is compiled (threads), checked against SDPA, and timed (do_bench) next to SDPA as torch picks its backend and
with each one forced. The JSON (bench/results/triton_attention_ceiling-<gpu>.json, or --out) is rewritten
after every row, so a hang, ended by faulthandler, leaves the rows before it.

H200, torch 2.11 (SDPA's default is cuDNN attention; its flash backend reaches 0.51 / 0.58 of it): the
best correct case reached 0.80 of SDPA at L=4096 (tma_dev_1loop_ws 128x128 w4 s2; tma_host 128x64 w4 s2
0.79) and 0.87 at L=16384 (tma_host 128x64 w4 s2; tma_dev 0.86), do_bench timing (a first run timed with
CUDA events: 0.80 / 0.83). TMA and warp specialisation move it by a few hundredths; nothing reaches 0.90.

Warp specialisation on sm_90 (the fused-attention tutorial has it only for non-causal forward with device
descriptors): NVGPUWarpSpecialization fails on the two-loop causal kernel (dots outside the specialised
loop; a one-loop kernel with the diagonal tile peeled off fails too) and with host descriptors (triton PR
7658); num_warps=8 skips it without a word; a branch in the loop body stops it. Where it acts
(tma_dev_1loop_ws, 4 warps) it adds a producer warp group and two consumer groups, 12 warps in all; at
128x64 w4 s3 that build wrote NaNs. The variants known to fail stay, shown as expected failures (xfail).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from bench.gpu_kernels import HEAD_DIM, NUM_Q_HEADS, PREFILL_LENGTHS, PREFILL_TARGET, causal_flops, median_s
from bench.results import result_header, result_path

LOG2_E = 1.4426950408889634  # 1/ln 2: the kernel works in base 2, so log2(e) is folded into the scale
SMOKE_SIZE = (2, 256, 64)  # [H, L, D]
BF16_TOL = 2e-2  # two bf16 ulps at |x| ~ 2: SDPA and the kernel round p and o at different points
FP32_TOL = 1e-4
CASE_TIMEOUT_S = 120.0  # one case: compile + check + time; past it the kernel is taken to hang
COMPILE_LENGTH = 4096  # --compile-only builds for L=4096: any L divisible by 128 specialises the same


@dataclass(frozen=True)
class LaunchShape:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


# (block_n, warps, stages) at block_m 128: 128 x 128 with 8 warps or 128 x 64 with 4 (the tutorial drops 8
# warps under 128 x 128 on sm_90), 128 x 64 x 8 warps as our paged kernel; 128 x 128 x 4 stages > 227 KB.
_GPU = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 2), (128, 8, 3))
GPU_SHAPES = tuple(LaunchShape(128, n, warps, stages) for n, warps, stages in _GPU)
# Warp specialisation acts only with num_warps=4; 128 x 128 x 3 stages would need 256 KB.
WS_SHAPES = (LaunchShape(128, 64, 4, 2), LaunchShape(128, 64, 4, 3), LaunchShape(128, 128, 4, 2))
SMOKE_SHAPES = (LaunchShape(64, 32, 4, 1), LaunchShape(64, 64, 4, 1), LaunchShape(32, 32, 4, 1))


@dataclass(frozen=True)
class Variant:
    """How the kernel reaches q/k/v/o, how it walks the key tiles, and whether Triton warp-specialises."""

    name: str
    loads: str  # "ptr": pointer loads; "host_desc": TensorDescriptor from the host; "dev_desc": in-kernel
    single_loop: bool = False  # one masked loop up to the diagonal instead of unmasked + masked loops
    warp_specialize: bool = False  # tl.range(..., warp_specialize=True) on every key loop
    known_failure: str = ""  # why Triton 3.6 cannot build it for sm_90: kept to see when that changes

    @property
    def shapes(self) -> tuple[LaunchShape, ...]:
        return WS_SHAPES if self.warp_specialize else GPU_SHAPES


# Why Triton 3.6 cannot build these for sm_90 (--compile-only and the first H200 run agree).
_LOOPS = "NVGPUWarpSpecialization: MLIR dominance assertion (dots outside the specialised loop)"
_HOST = "NVGPUWarpSpecialization: q/o tiles split over two consumer groups, host descriptor boxes are not"
VARIANTS = (
    Variant("ptr", "ptr"),
    Variant("tma_host", "host_desc"),
    Variant("tma_dev", "dev_desc"),
    Variant("tma_dev_ws", "dev_desc", warp_specialize=True, known_failure=_LOOPS),
    Variant("tma_dev_1loop", "dev_desc", single_loop=True),
    Variant("tma_dev_1loop_ws", "dev_desc", single_loop=True, warp_specialize=True),
    Variant("tma_host_1loop_ws", "host_desc", single_loop=True, warp_specialize=True, known_failure=_HOST),
)


@triton.jit
def _load_tile(src, row, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, LOADS: tl.constexpr):
    """Rows row .. row + BLOCK of the [H * L, HEAD_DIM] matrix: one TMA box, or BLOCK x HEAD_DIM loads."""
    if LOADS == "ptr":
        rows = (row + tl.arange(0, BLOCK)).to(tl.int64)
        return tl.load(src + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
    return src.load([row, 0])


@triton.jit
def _store_tile(dst, row, tile, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, LOADS: tl.constexpr):
    if LOADS == "ptr":
        rows = (row + tl.arange(0, BLOCK)).to(tl.int64)
        tl.store(dst + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], tile)
    else:
        dst.store([row, 0], tile)


@triton.jit
def _attend(
    acc, m_i, l_i, q, k_src, v_src, kv_row, start, end, q_pos, qk_scale,
    MASKED: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    LOADS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax (base 2) over keys [start, end) of one head, whose key 0 is row kv_row."""
    for n0 in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        n0 = tl.multiple_of(n0, BLOCK_N)
        k = _load_tile(k_src, kv_row + n0, BLOCK_N, HEAD_DIM, LOADS)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            # The first diagonal tile holds every row's own key, so no row's max stays -inf.
            visible = n0 + tl.arange(0, BLOCK_N)[None, :] <= q_pos[:, None]
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp2(qk - m_new[:, None])
        else:
            # qk_scale > 0 commutes with the max; the scale then rides in the FMA that subtracts it.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_src, kv_row + n0, BLOCK_N, HEAD_DIM, LOADS)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _causal_attention_kernel(
    q_src, k_src, v_src, o_src, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOADS: tl.constexpr,
    SINGLE_LOOP: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Heaviest query tiles first (tile t sees t + 1 key tiles): the short ones fill the grid's tail. Tiles
    # are the fast grid axis, so programs running together share one head's K/V in L2.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    if LOADS == "dev_desc":
        rows = tl.num_programs(1) * seq_len
        q_src = tl.make_tensor_descriptor(q_src, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
        k_src = tl.make_tensor_descriptor(k_src, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM])
        o_src = tl.make_tensor_descriptor(o_src, [rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
    head_row = head * seq_len
    m0 = tile * BLOCK_M
    q = _load_tile(q_src, head_row + m0, BLOCK_M, HEAD_DIM, LOADS)
    q_pos = m0 + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Two loops, not one with a per-tile mask branch (a branch in the loop body stops both pipelining and
    # warp specialisation): key tiles before the query tile are wholly visible, so the first needs no mask.
    if not SINGLE_LOOP:
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_src, v_src, head_row, 0, m0, q_pos, qk_scale,
            False, WARP_SPECIALIZE, BLOCK_N, HEAD_DIM, LOADS, DOT_PRECISION,
        )  # fmt: skip
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, k_src, v_src, head_row, 0 if SINGLE_LOOP else m0, m0 + BLOCK_M, q_pos, qk_scale,
        True, WARP_SPECIALIZE, BLOCK_N, HEAD_DIM, LOADS, DOT_PRECISION,
    )  # fmt: skip
    out = acc * (1.0 / l_i)[:, None]  # one reciprocal per row, not a division per element
    _store_tile(o_src, head_row + m0, out.to(q.dtype), BLOCK_M, HEAD_DIM, LOADS)


def kernel_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, variant: Variant, shape: LaunchShape
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, int]]:
    """(grid, positional args, launch options) of one launch; q/k/v/out [H, L, D] contiguous."""
    heads, seq_len, head_dim = q.shape
    assert q.shape == k.shape == v.shape == out.shape and q.dtype == k.dtype == v.dtype == out.dtype
    assert all(t.is_contiguous() for t in (q, k, v, out)), "the kernel views [H, L, D] as one [H * L, D]"
    assert seq_len % shape.block_m == 0 and shape.block_m % shape.block_n == 0, "no partial tiles"
    srcs: tuple[Any, ...] = (q, k, v, out)
    if variant.loads == "host_desc":
        boxes = (shape.block_m, shape.block_n, shape.block_n, shape.block_m)
        matrix = ([heads * seq_len, head_dim], [head_dim, 1])
        srcs = tuple(TensorDescriptor(t, *matrix, [rows, head_dim]) for t, rows in zip(srcs, boxes))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact; bf16 ignores it
    flags = (variant.loads, variant.single_loop, variant.warp_specialize, precision)
    args = (*srcs, seq_len, LOG2_E / math.sqrt(head_dim), head_dim, shape.block_m, shape.block_n, *flags)
    launch = {"num_warps": shape.num_warps, "num_stages": shape.num_stages}
    return (seq_len // shape.block_m, heads), args, launch


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant, shape: LaunchShape
) -> tuple[torch.Tensor, Any]:
    """softmax(q k^T / sqrt(D), causal) v per head of [H, L, D]; returns (out, the compiled kernel)."""
    out = torch.empty_like(q)
    grid, args, options = kernel_args(q, k, v, out, variant, shape)
    return out, _causal_attention_kernel[grid](*args, **options)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


def install_allocator(device: str) -> None:
    """Device-side descriptors live in a per-launch global scratch that Triton asks this allocator for."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def short_error(exc: BaseException) -> str:
    """MLIR and ptxas errors give the reason on the last line, Python's on the first: keep both."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [""]
    tail = f" ... {lines[-1]}" if len(lines) > 1 else ""
    return f"{type(exc).__name__}: {lines[0]}{tail}"[:400]


@dataclass(frozen=True)
class Row:
    """One (variant, launch shape, L): how it built, whether it answered right, and how fast."""

    variant: str
    config: str
    L: int
    tflops: float | None = None
    fraction: float | None = None  # of SDPA as torch picks its backend
    max_diff: float | None = None  # None when not run, or not finite (ok is then False)
    ok: bool | None = None  # within tolerance of the reference everywhere; None when it did not run
    warp_specialised: bool | None = None  # the TTGIR holds a ttg.warp_specialize op: WS really happened
    warps: int | None = None  # warp specialisation adds warp groups to num_warps
    regs: int | None = None
    spills: int | None = None
    smem_kb: float | None = None
    expected_failure: bool = False  # failed as Variant.known_failure says Triton 3.6 does on sm_90
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "xfail" if self.expected_failure else "ERROR"
        return {True: "ok", False: "BAD", None: "-"}[self.ok]


def failed(row: Row, variant: Variant, exc: BaseException) -> Row:
    return replace(row, error=short_error(exc), expected_failure=bool(variant.known_failure))


def built(row: Row, kernel: Any) -> Row:
    """The row with what Triton built: warp specialisation, warps, registers (GPU only), shared memory."""
    return replace(
        row,
        warp_specialised="ttg.warp_specialize" in kernel.asm.get("ttgir", ""),
        warps=kernel.metadata.num_warps,
        regs=getattr(kernel, "n_regs", None),
        spills=getattr(kernel, "n_spills", None),
        smem_kb=kernel.metadata.shared / 1024,
    )


def checked(row: Row, out: torch.Tensor, expected: torch.Tensor, tol: float) -> Row:
    diff = (out.float() - expected.float()).abs()
    ok = bool((diff <= tol * (1 + expected.float().abs())).all())  # NaN compares False: not ok
    max_diff = diff.max().item()
    return replace(row, ok=ok, max_diff=max_diff if math.isfinite(max_diff) else None)


HEADER = (
    f"{'variant':<18} {'config':<14} {'L':>6} {'TFLOP/s':>8} {'/SDPA':>6} {'max diff':>9} {'status':>6} "
    f"{'ws':>2} {'wp':>3} {'regs/sp':>8} {'KB':>3} error"
)


def format_row(r: Row) -> str:
    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"{r.variant:<18} {r.config:<14} {r.L:>6} {cell(r.tflops, '.1f'):>8} {cell(r.fraction, '.3f'):>6} "
        f"{cell(r.max_diff, '.2e'):>9} {r.status:>6} {'ws' if r.warp_specialised else '':>2} "
        f"{cell(r.warps, 'd'):>3} {cell(r.regs, 'd'):>4}/{cell(r.spills, 'd'):<3} "
        f"{cell(r.smem_kb, '.0f'):>3} {r.error}"
    )


# --- GPU run ---------------------------------------------------------------------------------------------


def sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flops: float) -> dict[str, float | str]:
    """TFLOP/s of SDPA as torch picks it ("default", the denominator) and with each backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rates: dict[str, float | str] = {}
    for name in ("DEFAULT", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]) if name != "DEFAULT" else contextlib.nullcontext():
                rates[name.lower()] = flops / median_s(lambda: reference_attention(q, k, v)) / 1e12
        except Exception as exc:  # a backend this build or GPU lacks
            rates[name.lower()] = short_error(exc)
    return rates


def precompile(cases: Sequence[tuple[Variant, LaunchShape]], sample: torch.Tensor, jobs: int) -> float:
    """Compile every case in `jobs` threads (compiling mostly releases the GIL); returns the wall time. Any
    [H, L, D] sample with L divisible by 128 specialises as the timed lengths do. Failures are left for the
    timed pass to meet and record."""
    begin = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
        for variant, shape in cases:
            grid, args, options = kernel_args(sample, sample, sample, sample, variant, shape)
            with contextlib.suppress(Exception):  # raised before compiling: the timed pass reports it
                _causal_attention_kernel.warmup(*args, grid=grid, **options)
    return time.perf_counter() - begin


def measure(
    row: Row, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], expected: torch.Tensor,
    variant: Variant, shape: LaunchShape, sdpa_rate: float,
) -> Row:  # fmt: skip
    """One launch checked against SDPA's answer, what Triton built, then the timing."""
    try:
        out, kernel = causal_attention(*inputs, variant, shape)
        row = built(checked(row, out, expected, BF16_TOL), kernel)
        rate = causal_flops(row.L) / median_s(lambda: causal_attention(*inputs, variant, shape)) / 1e12
    except Exception as exc:
        row = failed(row, variant, exc)
        lost = "illegal" in row.error or "misaligned" in row.error
        return replace(row, error=row.error + " [CUDA context lost: later rows fail too]") if lost else row
    return replace(row, tflops=rate, fraction=rate / sdpa_rate)


def best_rows(rows: Sequence[Row]) -> dict[tuple[int, str], Row]:
    """The fastest correct row of each (L, variant)."""
    good = sorted((r for r in rows if r.ok and r.fraction is not None), key=lambda r: r.fraction or 0.0)
    return {(r.L, r.variant): r for r in good}  # the fastest comes last and stays


def write_report(path: Path, doc: dict[str, Any], rows: Sequence[Row]) -> None:
    """The document, its rows and the ceiling (the fastest correct row) per length, as strict JSON."""
    ranked = sorted(best_rows(rows).values(), key=lambda r: r.fraction or 0.0)  # the fastest written last
    ceiling = {str(r.L): {"variant": r.variant, "config": r.config, "fraction": r.fraction} for r in ranked}
    body = {**doc, "ceiling": ceiling, "rows": [asdict(r) for r in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")


def run_gpu(variants: Sequence[Variant], lengths: Sequence[int], jobs: int, path: Path) -> None:
    install_allocator("cuda")
    doc: dict[str, Any] = {
        **result_header(),
        "capability": list(torch.cuda.get_device_capability()),
        "shape": f"[{NUM_Q_HEADS}, L, {HEAD_DIM}] bf16, contiguous, causal, batch 1",
        "timing": "triton.testing.do_bench median (bench/gpu_kernels.py median_s)",
        "target": PREFILL_TARGET,
        "sdpa_tflops": {},
    }
    cases = [(variant, shape) for variant in variants for shape in variant.shapes]
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n: torch.randn(NUM_Q_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    doc["precompile_s"] = precompile(cases, make(256), jobs)
    print(f"compiled {len(cases)} cases in {doc['precompile_s']:.1f} s, {jobs} threads", flush=True)
    rows: list[Row] = []
    for length in lengths:
        inputs = (make(length), make(length), make(length))
        sdpa = doc["sdpa_tflops"][str(length)] = sdpa_backends(*inputs, causal_flops(length))
        print(f"\nL={length}: SDPA TFLOP/s {sdpa}\n{HEADER}", flush=True)
        expected = reference_attention(*inputs)
        for variant, shape in cases:
            row = Row(variant.name, str(shape), length)
            # A deadlocked kernel never returns from synchronize: the file names it, faulthandler ends us.
            write_report(path, doc, [*rows, replace(row, error=f"hung: no answer in {CASE_TIMEOUT_S:.0f} s")])
            faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
            rows.append(measure(row, inputs, expected, variant, shape, float(sdpa["default"])))
            faulthandler.cancel_dump_traceback_later()
            write_report(path, doc, rows)
            print(format_row(rows[-1]), flush=True)
    for (length, name), r in sorted(best_rows(rows).items()):
        verdict = "met" if (r.fraction or 0.0) >= PREFILL_TARGET else "missed"
        print(f"best L={length} {name:<18} {r.config:<14} {r.fraction:.3f} of SDPA (target {verdict})")
    print(f"wrote {path}")


# --- CPU: interpreter smoke test, and sm_90 builds without a GPU ------------------------------------------


def smoke_rows(
    variants: Sequence[Variant],
    shapes: Sequence[LaunchShape] = SMOKE_SHAPES,
    size: Sequence[int] = SMOKE_SIZE,
) -> Iterator[Row]:
    """Every variant x shape in fp32 on [H, L, D] = size against SDPA (exact on CPU in fp32); through the
    interpreter when TRITON_INTERPRET=1 was set before this module was imported."""
    install_allocator("cpu")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*size, generator=gen) for _ in range(3))
    expected = reference_attention(q, k, v)
    for variant in variants:
        for shape in shapes:
            row = Row(variant.name, str(shape), q.shape[1])
            try:
                yield checked(row, causal_attention(q, k, v, variant, shape)[0], expected, FP32_TOL)
            except Exception as exc:
                yield failed(row, variant, exc)


def compile_for(variant: Variant, shape: LaunchShape, arch: int) -> Any:
    """Build one case for cuda:<arch> with no GPU here, specialised as the JIT would specialise contiguous
    bf16 [32, 4096, 128] tensors (through Triton's own binder: private API, as of 3.6)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = _causal_attention_kernel
    t = torch.empty(NUM_Q_HEADS, COMPILE_LENGTH, HEAD_DIM, dtype=torch.bfloat16)
    _, args, launch = kernel_args(t, t, t, t, variant, shape)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specs, options = binder(*args, **launch)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch, bound_args, specs, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def compile_rows(variants: Sequence[Variant], arch: int) -> Iterator[Row]:
    for variant in variants:
        for shape in variant.shapes:
            row = Row(variant.name, str(shape), COMPILE_LENGTH)
            try:
                yield built(row, compile_for(variant, shape, arch))
            except Exception as exc:
                yield failed(row, variant, exc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, fp32, tiny shapes")
    parser.add_argument("--compile-only", action="store_true", help="build for --arch without a GPU")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma-separated")
    parser.add_argument("--lengths", default=",".join(map(str, PREFILL_LENGTHS)), help="comma-separated")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile threads")
    parser.add_argument("--out", type=Path, help="JSON to write (GPU run)")
    args = parser.parse_args()
    variants = [next(v for v in VARIANTS if v.name == name) for name in args.variants.split(",")]
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # @triton.jit reads it when it decorates, at import: start again with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    # A failing MLIR pass otherwise prints its whole module (~100 KB) to stderr as a crash reproducer.
    os.environ.setdefault("TRITON_REPRODUCER_PATH", str(Path(tempfile.gettempdir()) / "attn_ceiling_repro"))
    if args.smoke or args.compile_only:
        print(HEADER, flush=True)
        failures = 0
        for row in smoke_rows(variants) if args.smoke else compile_rows(variants, args.arch):
            print(format_row(row), flush=True)
            failures += row.status in ("ERROR", "BAD")  # an expected failure is not one
        sys.exit(int(failures > 0))
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke or --compile-only")
    out = args.out or result_path("triton_attention_ceiling")
    run_gpu(variants, [int(n) for n in args.lengths.split(",")], args.jobs, out)


if __name__ == "__main__":
    main()
