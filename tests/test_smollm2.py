"""The embedded SmolLM2-135M-Instruct GGUF: our engine against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from diptych.engine.loader import embedded_model_path
from diptych.engine.messages import SamplingParams
from diptych.engine.tokenizer import load_tokenizer
from tests.factories import make_engine
from tests.hf_reference import load_hf_causal_lm

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colors.",
]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    return make_engine(None, block_size=16, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def hf_smollm2() -> torch.nn.Module:
    return load_hf_causal_lm(embedded_model_path())


def test_greedy_chat_tokens_match_transformers(engine, hf_smollm2: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(engine.source)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))  # one batch
    for prompt, seq in zip(prompts, seqs):
        with torch.no_grad():
            ref = hf_smollm2.generate(  # type: ignore[operator]  # transformers types generate as a Tensor attribute
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=list(engine.eos_token_ids),
                pad_token_id=engine.eos_token_ids[0],
            )[0, len(prompt) :].tolist()
        assert len(seq.output_token_ids) >= 4
        assert seq.output_token_ids == ref
    answer = tokenizer.decode(seqs[0].output_token_ids)
    assert "Paris" in answer
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_logits_close_to_transformers(engine, hf_smollm2: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import prefill_logits

    tokenizer = load_tokenizer(engine.source)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[1]}])
    ours = prefill_logits(engine, [prompt], chunk=13)[0]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
