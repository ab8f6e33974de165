"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

At batch 1 a decode step is some 300 small kernels back to back, and each loses time between the moment the
previous one's last program ends and its own programs run. A kernel launched with PDL may be scheduled once
every program of its predecessor has called `let_next_kernel_start`: its programs take SM slots as the
predecessor's free them and block at `wait_for_previous_kernel` until the predecessor has finished and its
writes are visible. The kernels signal after their main loop, before their stores. On an H200 (Llama-3-8B
shapes, B1 decode graph replayed as bench/profile_decode_step.py does, DIPTYCH_PDL=0 against 1): 4.21 ms
plain, 4.15 with PDL; signalling at the start instead, 4.32 (not profiled: likely the successor's
programs holding SM slots early); reading a linear layer's first weight tile before the wait, 4.39 into
registers and 4.45-5.32 as a 1-4 KB L2 prefetch of each weight row.

Two rules keep this correct. Every program of a kernel launched with PDL calls `wait_for_previous_kernel`
before it reads anything an earlier kernel wrote (or writes anything an earlier kernel reads), even a program
that does no other work: the kernel's completion is what its own successor waits for, so it must not
complete before its predecessor. And `let_next_kernel_start` only lets the successor be scheduled early; it
orders nothing, so it may come anywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def let_next_kernel_start(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
