"""Our Llama-family model against HF transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from diptych.engine.kv_cache import kv_block_bytes
from diptych.engine.messages import SamplingParams
from tests.factories import hf_greedy, make_engine, make_prompts, prefill_logits
from tests.hf_reference import load_hf_causal_lm

PROMPT_LENGTHS = [5, 11, 18, 31]
KINDS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_dir"]


def hf_model(path: str) -> torch.nn.Module:
    return load_hf_causal_lm(path)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_logits_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    engine = make_engine(path)
    prompts = make_prompts(PROMPT_LENGTHS, engine.model_config.vocab_size)
    ours = prefill_logits(engine, prompts, chunk=1024)  # one step, all four prompts batched
    hf = hf_model(path)
    for prompt, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    engine = make_engine(path)
    prompts = make_prompts(PROMPT_LENGTHS, engine.model_config.vocab_size, seed=1)
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    hf = hf_model(path)
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_token_ids == hf_greedy(hf, prompt, 32)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_chunked_prefill_matches_one_pass(tiny_llama3_dir: str) -> None:
    engine = make_engine(tiny_llama3_dir)
    prompts = make_prompts([9, 23, 40], engine.model_config.vocab_size, seed=2)
    whole = prefill_logits(engine, prompts, chunk=1024)
    chunked = prefill_logits(engine, prompts, chunk=7)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scheduler_chunking_and_preemption_keep_greedy_output(tiny_llama_dir: str) -> None:
    """A tight token budget (chunks of 7) and a cache so small that sequences get preempted and
    recomputed must not change greedy output."""
    prompts = make_prompts([6, 14, 25, 19], 384, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    roomy = make_engine(tiny_llama_dir).generate(prompts, params)
    block_bytes = kv_block_bytes(make_engine(tiny_llama_dir).model_config, 4, torch.float32)
    tight_engine = make_engine(
        tiny_llama_dir, max_num_batched_tokens=7, kv_cache_gib=30 * block_bytes / 2**30
    )
    tight = tight_engine.generate(prompts, params)
    assert tight_engine.blocks.num_blocks == 30
    assert [s.output_token_ids for s in tight] == [s.output_token_ids for s in roomy]
    assert sum(s.num_preemptions for s in tight) > 0
    assert tight_engine.blocks.num_free_blocks == tight_engine.blocks.num_blocks
