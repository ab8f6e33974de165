"""CPU benchmark: the embedded SmolLM2 on our engine against HF transformers `generate` on the same weights
(the same GGUF: HF dequantizes it to fp32), in the same process with the same torch threads, side by side.

Ours runs twice: as served (`diptych`: decode-sized products read the file's Q4_1/Q8_0 blocks, which
dequantize to exactly HF's fp32 weights, kernels/quantized_linear.py) and with fp32 weights only
(`diptych-fp32`: EngineConfig.cpu_quantized_weights off), so the gain of each part shows.

    python -m bench.cpu_engine [--prompt-len 512] [--decode-tokens 64] [--runs 5]

The two systems take turns, run by run, and each keeps its best time: the shared 2-core hosts this runs on
swing by 2-3x in memory bandwidth from one second to the next, and alternating exposes both to the same
swings. One untimed warm-up run of each comes first (ours packs its CPU decode weights on first use).
Also reported: the read bandwidth measured in the same run and the decode roofline it sets for each weight
form, every weight read once per step (the fp32 model is larger than the cache, so no step can be faster).

Prints a table and writes bench/results/cpu_engine-<host>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from bench.results import Row, write_result
from diptych.engine.linear import Linear
from diptych.engine.llm_engine import EngineConfig, LLMEngine
from diptych.engine.loader import embedded_model_path
from diptych.engine.messages import SamplingParams
from tests.hf_reference import hf_greedy_generate, load_hf_causal_lm

Run = Callable[[], None]


def best_interleaved(runs: int, fns: dict[str, Run]) -> dict[str, float]:
    """Best wall time of each function, the functions taking turns run by run after one warm-up each."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Run:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run() -> None:
        engine.generate(prompts, params)

    return run


def hf(model: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> Run:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed

    def run() -> None:
        hf_greedy_generate(model, ids, new_tokens)

    return run


def read_bandwidth(runs: int = 20, size_mb: int = 256) -> float:
    """Best read rate in bytes/s over a buffer far larger than the last-level cache (a sum reads it once)."""
    buffer = torch.ones(size_mb * 2**20 // 4)
    best = min(_timed(buffer.sum) for _ in range(runs))
    return buffer.numel() * 4 / best


def bytes_read_per_step(engine: LLMEngine) -> int:
    """Bytes of weights a decode step reads: each projection in the form its small-batch product takes
    (quantized blocks where it has them), the norms; not the embedding table, of which a step reads rows."""
    total, seen = 0, set()
    for module in engine.model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) in seen or isinstance(module, torch.nn.Embedding):
            continue
        seen.add(id(weight))
        quantized = module.quantized if isinstance(module, Linear) else None
        parts = [weight] if quantized is None else [quantized.codes, quantized.scales, quantized.offsets]
        total += sum(p.numel() * p.element_size() for p in parts if p is not None)
    return total


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()

    path = embedded_model_path()
    config = EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.5, load_progress=False)
    engine = LLMEngine(config)
    dense = LLMEngine(dataclasses.replace(config, cpu_quantized_weights=False))
    reference = load_hf_causal_lm(path)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(100, vocab, (batch, length), generator=gen).tolist()

    def both(batch: list[list[int]], new_tokens: int) -> dict[str, Run]:
        return {
            "diptych": ours(engine, batch, new_tokens),
            "diptych-fp32": ours(dense, batch, new_tokens),
            "hf": hf(reference, batch, new_tokens),
        }

    rows: list[Row] = []
    long_prompt = prompts(1, args.prompt_len)
    for name, t in best_interleaved(args.runs, both(long_prompt, 1)).items():
        rows.append(Row(f"prefill_T{args.prompt_len}", args.prompt_len / t, "tok/s", system=name))
    bandwidth = read_bandwidth()
    step_bytes = {"quantized": bytes_read_per_step(engine), "fp32": bytes_read_per_step(dense)}
    for batch in (1, 8):
        p = prompts(batch, args.decode_prompt_len)
        first = best_interleaved(args.runs, both(p, 1))
        full = best_interleaved(args.runs, both(p, args.decode_tokens))
        for name in full:
            rate = batch * (args.decode_tokens - 1) / max(full[name] - first[name], 1e-9)
            rows.append(Row(f"decode_B{batch}", rate, "tok/s", system=name))
        for form, nbytes in step_bytes.items():
            note = f"{form} weights read once a step"
            rows.append(
                Row(
                    f"decode_B{batch}",
                    batch * bandwidth / nbytes,
                    "tok/s",
                    system=f"roofline-{form}",
                    note=note,
                )
            )
    write_result(
        "cpu_engine",
        rows,
        extra={
            "threads": threads,
            "model": "SmolLM2-135M-Instruct Q4_1 -> fp32",
            "cpu_count": os.cpu_count(),
            "read_bandwidth_gbs": bandwidth / 1e9,
            "bytes_read_per_step": step_bytes,
        },
        compare=(("diptych", "diptych-fp32"), "hf"),
    )


if __name__ == "__main__":
    main()
