"""The benchmarks' own CPU checks run their Triton kernels in the interpreter (set before any @triton.jit)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
