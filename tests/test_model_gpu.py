"""On a GPU (Triton kernels): the tiny test models against transformers on the same weights.

bf16: logits within a relative L2 error of 2e-2 of transformers in bf16 (both round differently at every
layer; 2e-2 is about three bf16 ulps of accumulated drift over three layers). fp32: greedy tokens equal."""

from __future__ import annotations

import pytest
import torch

from engine.messages import SamplingParams
from tests.factories import hf_greedy, make_engine, make_prompts, prefill_logits

pytestmark = pytest.mark.gpu
KINDS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_dir"]
BF16_REL_L2 = 2e-2


def hf_on_gpu(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.cuda().eval()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_close_to_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    engine = make_engine(path, dtype="bfloat16", device="cuda", cuda_graphs=False, gpu_memory_fraction=0.05)
    prompts = make_prompts([5, 11, 18, 31], engine.model_config.vocab_size)
    ours = prefill_logits(engine, prompts, chunk=1024)
    hf = hf_on_gpu(path, torch.bfloat16)
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
        rel = (logits.float() - ref).norm() / ref.norm()
        assert rel < BF16_REL_L2, f"relative L2 error {rel:.3e}"


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_greedy_tokens_equal_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    engine = make_engine(path, dtype="float32", device="cuda", gpu_memory_fraction=0.05)
    prompts = make_prompts([5, 11, 18, 31], engine.model_config.vocab_size, seed=1)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    hf = hf_on_gpu(path, torch.float32)
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_token_ids == hf_greedy(hf, prompt, 32)
