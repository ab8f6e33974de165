"""HF transformers as the independent reference: loading a checkpoint offline with its plain torch layers,
and its own greedy generation, which tests and benchmarks compare our engine against."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# transformers 5.x "kernelizes" layers with Hugging Face's hub kernels by default, which downloads code at
# load time; the reference must run its own torch layers, offline. The variable covers models built from a
# config too (bench/gpu_engine.py), use_kernels=False the explicit loads below.
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own model for a HF directory or a GGUF file (dequantized by transformers), in eval
    mode, from local files only and without hub kernels."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    where: dict[str, Any] = {"pretrained_model_name_or_path": path}
    if path.is_file():
        where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        **where, dtype=dtype, local_files_only=True, use_kernels=False
    )
    return model.eval()


@torch.inference_mode()
def hf_greedy_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`model.generate` of exactly new_tokens greedy tokens after each row of ids [B, T] (equal lengths, no
    padding; EOS does not stop it). Returns prompt and continuation, [B, T + new_tokens]."""
    return model.generate(  # type: ignore[operator, no-any-return]  # transformers types it as a Tensor attribute
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
