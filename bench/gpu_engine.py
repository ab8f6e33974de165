"""The engine on one GPU with random Llama-3-8B-shaped weights in bf16, against ceilings measured in the
same run (the cost of a forward does not depend on the weights' values).

    python -m bench.gpu_engine [--decode-steps 32] [--prefill-reps 3]

- decode_step_llama3_8b_B{1,64}: wall time of one engine step (schedule, inputs, forward, sampling) with
  every sequence decoding at context 2048, CUDA graphs on ("graphs") and off ("eager"), async scheduling
  on (the engine's default on CUDA: the host prepares a step while the device runs the one before) and,
  for the graphs, off ("graphs_serial"), against the roofline: bytes of weights plus KV read per step over
  the HBM copy bandwidth. Target 0.85 (graphs).
- prefill_llama3_8b_T{2048,8192,32768}: one prompt prefilled in one step; model FLOPs per second (MFU)
  against the bf16 matmul rate. Target 0.65.
- decode_vs_hf_B32: decode tokens/s at batch 32 (prompts of 128, 64 new tokens, greedy) against HF
  transformers `generate` on the same GPU with the same shapes and the same random init. Target 10x.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from bench.ceilings import against_target, copy_bandwidth, matmul_rate
from bench.results import Row, write_result
from diptych.engine.config import ModelConfig
from diptych.engine.llm_engine import EngineConfig, LLMEngine, load_model
from diptych.engine.messages import GenerateRequest, SamplingParams, TokenDelta
from diptych.engine.model import init_random_weights
from tests.hf_reference import hf_greedy_generate

PRESET = "llama3-8b"
TAG = PRESET.replace("-", "_")
CONTEXT = 2048
DECODE_BATCHES = (1, 64)
PREFILL_LENGTHS = (2048, 8192, 32768)
HF_BATCH, HF_PROMPT, HF_NEW_TOKENS = 32, 128, 64
WARMUP_STEPS = 3
DECODE_TARGET, PREFILL_TARGET, HF_TARGET = 0.85, 0.65, 10.0
DTYPE_BYTES = 2  # bf16


def engine_config() -> EngineConfig:
    return EngineConfig(
        model=f"random:{PRESET}",
        dtype="bfloat16",
        device="cuda",
        max_num_seqs=max(DECODE_BATCHES),
        max_num_batched_tokens=max(PREFILL_LENGTHS),
        max_model_len=max(PREFILL_LENGTHS) + 64,
        gpu_memory_fraction=0.4,  # of what the weights leave: room for 32k-token activations and HF later
        load_progress=False,
    )


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_step_seconds(engine: LLMEngine, batch: int, steps: int) -> float:
    """Median wall time of engine.step() with `batch` sequences decoding at CONTEXT. Their prompt KV is
    admitted the way a decode worker admits a prefilled request (its values do not change the cost). With
    async scheduling a step returns the tokens of the step before it, so each timed step still carries one
    step's tokens back to the host; the first step returns none."""
    prompts = random_prompts(batch, CONTEXT, engine.model_config.vocab_size)
    ids = [f"decode-B{batch}-{i}" for i in range(batch)]
    for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
        request = GenerateRequest(request_id, tuple(prompt), greedy(WARMUP_STEPS + steps + 2))
        assert engine.blocks.reserve(request_id, CONTEXT), "the KV cache is too small for the batch"
        engine.admit_prefilled(request, seed=i, first=TokenDelta(request_id, (prompt[-1],)))
    times = []
    for _ in range(WARMUP_STEPS + steps):
        t0 = time.perf_counter()
        deltas = engine.step()  # ends waiting for a step's sampled tokens on the host
        times.append(time.perf_counter() - t0)
        assert len(deltas) == batch or (not times[:-1] and engine.in_flight is not None)
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished():  # the step still in flight
        engine.step()
    return statistics.median(times[WARMUP_STEPS:])


def decode_roofline_seconds(config: ModelConfig, batch: int, context: float, bandwidth: float) -> float:
    """Every weight read once per step (the input embedding table only at the batch's rows, so not counted
    unless tied to the LM head), plus every cached K and V of the batch."""
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    weight_bytes = (config.num_params - embedding) * DTYPE_BYTES
    kv_bytes = batch * context * config.kv_bytes_per_token(DTYPE_BYTES)
    return (weight_bytes + kv_bytes) / bandwidth


def prefill_flops(config: ModelConfig, length: int) -> float:
    """2 FLOPs per layer weight per token, the LM head for the one sampled row, and causal attention
    (QK^T and PV over half the score matrix)."""
    c = config
    layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    layer += 3 * c.hidden_size * c.intermediate_size
    linear = 2 * length * c.num_layers * layer + 2 * c.vocab_size * c.hidden_size
    attention = c.num_layers * 2 * 2 * c.q_size * length * length / 2
    return linear + attention


def prefill_seconds(engine: LLMEngine, length: int, reps: int) -> float:
    prompt = random_prompts(1, length, engine.model_config.vocab_size, seed=length)
    engine.generate(prompt, greedy(1))  # warm-up: Triton compiles for this shape
    return statistics.median(timed(lambda: engine.generate(prompt, greedy(1))) for _ in range(reps))


def decode_rate(generate: Callable[[int], object]) -> float:
    """Decode tokens/s of a batch: (run to HF_NEW_TOKENS - run to 1 token) removes the prefill."""
    generate(2)  # warm-up
    first = timed(lambda: generate(1))
    full = timed(lambda: generate(HF_NEW_TOKENS))
    return HF_BATCH * (HF_NEW_TOKENS - 1) / (full - first)


def ours_generate(engine: LLMEngine, prompts: list[list[int]]) -> Callable[[int], object]:
    return lambda n: engine.generate(prompts, greedy(n))


def hf_generate(model: torch.nn.Module, prompts: list[list[int]]) -> Callable[[int], object]:
    ids = torch.tensor(prompts, device="cuda")  # equal lengths: no padding
    return lambda n: hf_greedy_generate(model, ids, n)


def hf_model(config: ModelConfig) -> torch.nn.Module:
    """transformers' own Llama with our shapes, built in bf16 on the GPU, given our random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c, scaling = config, config.rope_scaling
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta)
        if scaling is None
        else dict(
            rope_type="llama3",
            rope_theta=c.rope_theta,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        ),
        tie_word_embeddings=c.tie_word_embeddings,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default)
    init_random_weights(model)
    return model.eval()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def decode_rows(engine: LLMEngine, steps: int, bandwidth: float) -> list[Row]:
    graphs = engine.runner.graphs is not None
    system = ("graphs" if graphs else "eager") + ("" if engine.config.overlaps_steps else "_serial")
    rows = []
    for batch in DECODE_BATCHES:
        seconds = decode_step_seconds(engine, batch, steps)
        mean_context = CONTEXT + 1 + WARMUP_STEPS + steps / 2
        roofline = decode_roofline_seconds(engine.model_config, batch, mean_context, bandwidth)
        row = Row(f"decode_step_{TAG}_B{batch}", seconds * 1e3, "ms", roofline * 1e3, system)
        rows.append(against_target(row, DECODE_TARGET) if system == "graphs" else row)  # the rest: to compare
    return rows


def prefill_rows(engine: LLMEngine, reps: int, flops: float) -> list[Row]:
    rows = []
    for length in PREFILL_LENGTHS:
        rate = prefill_flops(engine.model_config, length) / prefill_seconds(engine, length, reps)
        rows.append(
            against_target(
                Row(f"prefill_{TAG}_T{length}", rate / 1e12, "TFLOP/s", flops / 1e12), PREFILL_TARGET
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prefill-reps", type=int, default=3)
    args = parser.parse_args()

    bandwidth, flops = copy_bandwidth(), matmul_rate()
    extra: dict[str, Any] = {
        "hbm_copy_bandwidth_GBps": bandwidth / 1e9,
        "bf16_matmul_TFLOPs": flops / 1e12,
        "model": f"random:{PRESET}, bf16",
        "decode_context": CONTEXT,
        "decode_steps": args.decode_steps,
        "ceiling_meaning": "decode ms rows: roofline ms (fraction = roofline / measured); prefill: "
        "bf16 matmul TFLOP/s (fraction = MFU); decode_vs_hf: HF tok/s (fraction = speedup)",
    }
    free_gpu()
    model, _ = load_model(engine_config())
    config = model.config
    engine = LLMEngine(engine_config(), model=model)
    rows = decode_rows(engine, args.decode_steps, bandwidth) + prefill_rows(engine, args.prefill_reps, flops)
    ours_rate = decode_rate(ours_generate(engine, random_prompts(HF_BATCH, HF_PROMPT, config.vocab_size)))
    engine.config = replace(engine.config, async_scheduling=False)
    rows += decode_rows(engine, args.decode_steps, bandwidth)
    engine.config = replace(engine.config, async_scheduling=True)
    # Eager on the same engine: a second engine would size its KV cache while the model's attention
    # layers still hold views of this one's, so it would find too little memory free.
    engine.runner.graphs = None
    rows += decode_rows(engine, args.decode_steps, bandwidth)
    del engine
    write_result("gpu_engine", rows, extra)  # now, so that a failure in the HF part keeps these rows
    del model
    free_gpu()

    reference = hf_model(config)
    hf_rate = decode_rate(hf_generate(reference, random_prompts(HF_BATCH, HF_PROMPT, config.vocab_size)))
    name = f"decode_vs_hf_B{HF_BATCH}"
    ours = Row(name, ours_rate, "tok/s", hf_rate, "diptych", "fraction: speedup over HF")
    rows += [against_target(ours, HF_TARGET), Row(name, hf_rate, "tok/s", system="hf")]
    extra["hf_attn_implementation"] = getattr(reference.config, "_attn_implementation", None)
    write_result("gpu_engine", rows, extra)


if __name__ == "__main__":
    main()
