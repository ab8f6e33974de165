"""On a GPU (Triton kernels): the tiny test models against transformers on the same weights.

bf16: logits within a relative L2 error of 2e-2 of transformers in bf16 (both round differently at every
layer; 2e-2 is about three bf16 ulps of accumulated drift over three layers). fp32: greedy tokens equal."""

from __future__ import annotations

import pytest
import torch

from diptych.engine.messages import SamplingParams
from tests.factories import hf_greedy, make_engine, make_prompts, prefill_logits
from tests.hf_reference import load_hf_causal_lm

pytestmark = pytest.mark.gpu
KINDS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_dir"]
BF16_REL_L2 = 2e-2


def hf_on_gpu(path: str, dtype: torch.dtype) -> torch.nn.Module:
    return load_hf_causal_lm(path, dtype).cuda()


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


def test_a_single_row_mlp_runs_the_skinny_kernel_and_matches_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """At one row the MLP's gate/up (with the SwiGLU gate fused) and down both take kernels.ops.skinny_linear,
    and the result is the fp32 product's within bf16 precision."""
    from diptych.engine.config import ModelConfig
    from diptych.engine.model import LlamaMLP
    from diptych.kernels import ops
    from diptych.kernels.activation import silu_and_mul_reference

    config = ModelConfig(
        vocab_size=256, hidden_size=256, intermediate_size=704, num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=64,
    )  # fmt: skip
    mlp = LlamaMLP(config).to("cuda", torch.bfloat16)
    fused_flags: list[bool] = []
    real = ops.skinny_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fuse_silu: bool = False):
        fused_flags.append(fuse_silu)
        return real(x, weight, bias, fuse_silu)

    monkeypatch.setattr(ops, "skinny_linear", spy)
    x = torch.randn(1, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        got = mlp(x).float()
        gated = silu_and_mul_reference(torch.nn.functional.linear(x.float(), mlp.gate_up_proj.weight.float()))
        want = torch.nn.functional.linear(gated, mlp.down_proj.weight.float())
    assert fused_flags == [True, False]  # gate/up with the gate, then down
    assert ((got - want).norm() / want.norm()).item() < BF16_REL_L2
