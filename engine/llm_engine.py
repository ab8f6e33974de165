"""The single-process engine: an engine core over a local executor, in one loop.

This is the colocated baseline and the reference the disaggregated path is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

from diptych.engine.core import EngineCore, RequestError
from diptych.engine.engine_config import EngineConfig
from diptych.engine.executor import LocalExecutor, load_model
from diptych.engine.messages import GenerateRequest, SamplingParams
from diptych.engine.model import LlamaForCausalLM
from diptych.engine.sequence import Sequence

__all__ = ["EngineConfig", "LLMEngine", "RequestError", "load_model"]


class LLMEngine(EngineCore):
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM | None = None) -> None:
        executor = LocalExecutor(config, model)
        super().__init__(config, executor)
        executor.prepare(config, self.max_model_len)
        self.model, self.source = executor.model, executor.source
        self.kv_cache, self.runner = executor.kv_cache, executor.runner

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion in one batch (tests, benchmarks, the CLI)."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, all_params)):
            request_id = f"gen-{time.monotonic_ns()}-{i}"
            self.add_request(GenerateRequest(request_id, tuple(prompt), p))
            seqs.append(self.sequences[request_id])
        while self.has_unfinished():
            self.step()
        return seqs
