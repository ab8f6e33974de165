"""Factories for tests: tiny random HF checkpoints, engines, prompts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from diptych.engine.llm_engine import LLMEngine

TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_hf_model(directory: Path, kind: str) -> str:
    """Save a tiny random model with transformers' own classes and save_pretrained (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed({"llama": 1, "qwen2": 2, "llama3": 3}[kind])
    if kind == "qwen2":
        shape: dict[str, Any] = dict(
            TINY_SHAPE,
            num_attention_heads=6,
            num_key_value_heads=2,
            hidden_size=96,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
        )
        model: PreTrainedModel = Qwen2ForCausalLM(Qwen2Config(**shape))
    elif kind == "llama3":
        scaling: dict[str, Any] = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
        llama3: dict[str, Any] = dict(TINY_SHAPE, rope_theta=500000.0, rope_scaling=scaling)
        model = LlamaForCausalLM(LlamaConfig(**llama3))
    else:
        model = LlamaForCausalLM(LlamaConfig(**dict(TINY_SHAPE, num_key_value_heads=1)))
    # Larger weights than the default init so logits vary a lot from token to token (a real test of
    # greedy agreement rather than a flat distribution).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def make_engine(model: str | None, **overrides: object) -> LLMEngine:
    from diptych.engine.llm_engine import EngineConfig, LLMEngine

    settings: dict[str, object] = dict(
        model=model,
        dtype="float32",
        device="cpu",
        block_size=4,
        kv_cache_gib=0.05,
        max_num_batched_tokens=512,
        load_progress=False,
    )
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))  # type: ignore[arg-type]


def make_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def prefill_logits(engine: LLMEngine, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """Logits at every prompt position, computed in steps of at most `chunk` tokens per sequence,
    all sequences batched together in each step (through the engine's own runner and paged cache)."""
    from diptych.engine.forward_context import forward_context
    from diptych.engine.messages import SamplingParams
    from diptych.engine.scheduler import ScheduledChunk
    from diptych.engine.sequence import Sequence

    seqs = [Sequence(f"prefill-{i}", list(p), SamplingParams(), seed=0) for i, p in enumerate(prompts)]
    for s in seqs:
        assert engine.blocks.allocate_prompt(s.request_id, s.prompt_token_ids) == 0
    pieces: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in seqs}
    try:
        while True:
            todo = [s for s in seqs if s.num_uncomputed > 0]
            if not todo:
                break
            chunks = [ScheduledChunk(s, s.num_computed_tokens, min(chunk, s.num_uncomputed)) for s in todo]
            tables = [engine.blocks.block_table(s.request_id) for s in todo]
            inputs = engine.runner.prepare(chunks, tables)
            with torch.inference_mode(), forward_context(inputs.meta):
                logits = engine.model.compute_logits(engine.model(inputs.input_ids, inputs.positions))
            bounds = inputs.meta.cu_seqlens_q.tolist()
            for i, c in enumerate(chunks):
                pieces[c.seq.request_id].append(logits[bounds[i] : bounds[i + 1]])
                c.seq.num_computed_tokens += c.num_tokens
    finally:
        for s in seqs:
            engine.blocks.free(s.request_id)
    return [torch.cat(pieces[s.request_id]) for s in seqs]


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one prompt, exactly new_tokens long (EOS does not stop it)."""
    from tests.hf_reference import hf_greedy_generate

    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    return hf_greedy_generate(model, ids, new_tokens)[0, len(prompt) :].tolist()
