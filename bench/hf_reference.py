"""HF transformers' own greedy generation, the reference that benchmarks and tests compare against."""

from __future__ import annotations

import torch


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
