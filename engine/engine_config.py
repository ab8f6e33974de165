"""How an engine is built: model, device, KV budget, scheduling limits (frozen; one per worker)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a HF dir, a .gguf file, "random:<preset>", or None for the embedded model
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    block_size: int = 16
    kv_cache_gib: float = 1.0  # CPU budget
    gpu_memory_fraction: float = 0.85  # of the memory free after the weights load
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunk_size: int | None = None  # per-sequence prefill chunk (None: the whole token budget)
    max_model_len: int | None = None  # default: the model's own
    enable_prefix_caching: bool = False
    seed: int = 0
    load_progress: bool = True
    cuda_graphs: bool = True  # replay pure-decode steps from CUDA graphs (CUDA only; ignored on CPU)
    # Launch the next decode step before the current one's tokens reach the host, so the host's work hides
    # behind the device's (None: on for CUDA; on CPU the forward runs on the host, so nothing would hide).
    async_scheduling: bool | None = None
    # On the CPU in fp32, projections a GGUF stores as Q4_0, Q4_1 or Q8_0 keep those blocks beside the fp32
    # weight, and batches of up to 32 rows multiply the blocks directly: the same weights, 3.6-5.3x fewer
    # bytes read a decode step (kernels/quantized_linear.py).
    cpu_quantized_weights: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size must be a power of two (the attention kernels need it), got {self.block_size}"
            )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def overlaps_steps(self) -> bool:
        if self.async_scheduling is None:
            return self.torch_device.type == "cuda"
        return self.async_scheduling

    @property
    def keeps_quantized_weights(self) -> bool:
        return (
            self.cpu_quantized_weights
            and self.torch_device.type == "cpu"
            and self.torch_dtype == torch.float32
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {self.dtype!r}")
        return dtypes[self.dtype]
