"""CPU benchmark: the embedded SmolLM2 on our engine against HF transformers `generate`, same weights
(the same GGUF, dequantized to fp32), same threads, one run, side by side.

    python -m bench.cpu_engine [--prompt-len 512] [--decode-tokens 64]

Prints a table and writes bench/results/cpu_engine-<host>.json.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from bench.results import Row, write_result
from engine.llm_engine import EngineConfig, LLMEngine
from engine.loader import embedded_model_path
from engine.messages import SamplingParams


def best_of(runs: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> Callable[[], None]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate(prompts, params) and None


def hf(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> Callable[[], None]:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed

    def run() -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    threads = torch.get_num_threads()

    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    engine = LLMEngine(EngineConfig(dtype="float32", device="cpu", kv_cache_gib=0.5, load_progress=False))
    reference = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(100, vocab, (batch, length), generator=gen).tolist()

    rows: list[Row] = []
    long_prompt = prompts(1, args.prompt_len)
    for name, make in (("diptych", ours), ("hf", hf)):
        target = engine if name == "diptych" else reference
        t = best_of(args.runs, make(target, long_prompt, 1))  # type: ignore[arg-type]
        rows.append(Row(f"prefill_T{args.prompt_len}", args.prompt_len / t, "tok/s", system=name))
    for batch in (1, 8):
        p = prompts(batch, args.decode_prompt_len)
        for name, make in (("diptych", ours), ("hf", hf)):
            target = engine if name == "diptych" else reference
            first = best_of(args.runs, make(target, p, 1))  # type: ignore[arg-type]
            full = best_of(args.runs, make(target, p, args.decode_tokens))  # type: ignore[arg-type]
            rate = batch * (args.decode_tokens - 1) / max(full - first, 1e-9)
            rows.append(Row(f"decode_B{batch}", rate, "tok/s", system=name))
    write_result(
        "cpu_engine",
        rows,
        extra={
            "threads": threads,
            "model": "SmolLM2-135M-Instruct Q4_1 -> fp32",
            "cpu_count": os.cpu_count(),
        },
        compare=("diptych", "hf"),
    )


if __name__ == "__main__":
    main()
