"""The single-process engine: scheduler + model runner in one loop.

This is the colocated baseline and the reference the disaggregated path is tested against.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from diptych.engine import sampler
from diptych.engine.block_manager import BlockManager
from diptych.engine.config import ModelConfig
from diptych.engine.forward_context import KVHook
from diptych.engine.kv_cache import PagedKVCache, kv_budget_bytes
from diptych.engine.linear import use_cpu_weight_layout
from diptych.engine.loader import (
    ModelSource,
    iter_quantized_weights,
    iter_weights,
    load_model_config,
    resolve_model,
)
from diptych.engine.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from diptych.engine.model import LlamaForCausalLM, build_model, init_random_weights
from diptych.engine.model_runner import LaunchedStep, ModelRunner, SampledTokens
from diptych.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from diptych.engine.sequence import Sequence
from diptych.kernels import native

RANDOM_PREFIX = "random:"


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context or the cache, duplicate id)."""


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a HF dir, a .gguf file, "random:<preset>", or None for the embedded model
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    block_size: int = 16
    kv_cache_gib: float = 1.0  # CPU budget
    gpu_memory_fraction: float = 0.85  # of the memory free after the weights load
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunk_size: int | None = None  # per-sequence prefill chunk (None: the whole token budget)
    max_model_len: int | None = None  # default: the model's own
    enable_prefix_caching: bool = False
    seed: int = 0
    load_progress: bool = True
    cuda_graphs: bool = True  # replay pure-decode steps from CUDA graphs (CUDA only; ignored on CPU)
    # Launch the next decode step before the current one's tokens reach the host, so the host's work hides
    # behind the device's (None: on for CUDA; on CPU the forward runs on the host, so nothing would hide).
    async_scheduling: bool | None = None
    # On the CPU in fp32, projections a GGUF stores as Q4_0, Q4_1 or Q8_0 keep those blocks beside the fp32
    # weight, and batches of up to 32 rows multiply the blocks directly: the same weights, 3.6-5.3x fewer
    # bytes read a decode step (kernels/quantized_linear.py).
    cpu_quantized_weights: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size must be a power of two (the attention kernels need it), got {self.block_size}"
            )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def overlaps_steps(self) -> bool:
        if self.async_scheduling is None:
            return self.torch_device.type == "cuda"
        return self.async_scheduling

    @property
    def keeps_quantized_weights(self) -> bool:
        return (
            self.cpu_quantized_weights
            and self.torch_device.type == "cpu"
            and self.torch_dtype == torch.float32
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {self.dtype!r}")
        return dtypes[self.dtype]


def load_model(config: EngineConfig) -> tuple[LlamaForCausalLM, ModelSource | None]:
    """Build the model on its device with weights from the checkpoint, or random ones for a preset shape."""
    from diptych.engine.config import preset

    device, dtype = config.torch_device, config.torch_dtype
    if config.model and config.model.startswith(RANDOM_PREFIX):
        model_config = preset(config.model[len(RANDOM_PREFIX) :])
        source = None
    else:
        source = resolve_model(config.model)
        model_config = load_model_config(source)
    model = build_model(model_config, dtype, device)
    if source is None:
        init_random_weights(model, config.seed)
    else:
        model.load_weights(iter_weights(source, dtype, progress=config.load_progress))
    use_cpu_weight_layout(model)
    if source is not None and config.keeps_quantized_weights:
        model.attach_quantized_weights(iter_quantized_weights(source))
    return model.eval(), source


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM | None = None) -> None:
        self.config = config
        self.device = config.torch_device
        self.model, self.source = (model, None) if model is not None else load_model(config)
        self.model_config: ModelConfig = self.model.config
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        budget = kv_budget_bytes(self.device, config.kv_cache_gib, config.gpu_memory_fraction)
        self.kv_cache = PagedKVCache.from_budget(
            self.model_config, budget, config.block_size, config.torch_dtype, self.device
        )
        self.blocks = BlockManager(self.kv_cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, config.chunk_size
            ),
            self.blocks,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        if config.cuda_graphs and self.device.type == "cuda":
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        if self.device.type == "cpu":
            native.build_all()
        sampler.warm_up(self.model_config.vocab_size, self.device)
        self.sequences: dict[str, Sequence] = {}
        self._rng = random.Random(config.seed)
        self.in_flight: LaunchedStep | None = None  # launched, tokens not yet read back (async scheduling)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def add_request(self, request: GenerateRequest) -> None:
        self.check_request(request)
        seq = Sequence(
            request.request_id,
            list(request.prompt_token_ids),
            request.sampling,
            self.request_seed(request),
            arrival_time=request.arrival_time or time.time(),
        )
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)

    def check_request(self, request: GenerateRequest) -> None:
        n = len(request.prompt_token_ids)
        if request.request_id in self.sequences:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but the model's context is {self.max_model_len} tokens "
                "(the prompt must leave room for at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        longest = min(n + request.sampling.max_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise RequestError(
                f"a request of {longest} tokens needs more KV blocks than the cache has "
                f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens): raise the KV budget"
            )

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def step(self, plan: Callable[[SchedulerOutput], KVHook | None] | None = None) -> list[TokenDelta]:
        """Schedule and run one step; returns one delta per sequence that sampled a token.

        plan, if given, sees the step's schedule before it runs and may return a hook that every
        attention layer calls with its new K/V (the prefill worker streams KV through it).

        With async scheduling, a step of decodes alone is launched and the deltas returned are those of
        the step before it, whose tokens are read back while the device runs the new one; the new step
        decodes the pending tokens from the device. Any other step first resolves the one in flight. A
        sequence that the resolved tokens finish has already been launched once more: that token is
        dropped, and its KV, written in stream order before any later use of the blocks, is never read."""
        ahead = self.config.overlaps_steps and plan is None and self.scheduler.can_schedule_ahead()
        if not ahead:
            deltas = self._resolve_in_flight()
            out = self.scheduler.schedule()
            if not out.chunks:
                return deltas
            step = self._launch(out, plan(out) if plan else None, previous=None)
            return deltas + self._deltas(step.seqs, self.runner.resolve(step))
        out = self.scheduler.schedule()
        if not out.chunks:  # every running sequence has its last token in flight
            return self._resolve_in_flight()
        step = self._launch(out, None, previous=self.in_flight)
        for seq in step.seqs:
            seq.num_pending_tokens += 1
        deltas = self._resolve_in_flight()
        self.in_flight = step
        return deltas

    def _launch(
        self, out: SchedulerOutput, hook: KVHook | None, previous: LaunchedStep | None
    ) -> LaunchedStep:
        started = time.time()
        for chunk in out.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = started
        tables = [self.blocks.block_table(c.seq.request_id) for c in out.chunks]
        step = self.runner.launch(out, tables, hook, previous)
        self.scheduler.advance(out)
        return step

    def _resolve_in_flight(self) -> list[TokenDelta]:
        step, self.in_flight = self.in_flight, None
        if step is None:
            return []
        for seq in step.seqs:
            seq.num_pending_tokens -= 1
        return self._deltas(step.seqs, self.runner.resolve(step))

    def _deltas(self, seqs: list[Sequence], sampled: SampledTokens) -> list[TokenDelta]:
        """Append each sequence's sampled token; a sequence finished meanwhile (aborted, or stopped by its
        previous token while this one was in flight) drops it."""
        now = time.time()
        deltas = []
        for i, seq in enumerate(seqs):
            if seq.is_finished:
                continue
            logprob = sampled.logprobs[i] if sampled.logprobs is not None else None
            deltas.append(self._append(seq, sampled.token_ids[i], logprob, now))
        return deltas

    def _append(self, seq: Sequence, token: int, logprob: float | None, now: float) -> TokenDelta:
        first = not seq.output_token_ids
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if self.scheduler.append_token(seq, token, self.eos_token_ids):
            self.sequences.pop(seq.request_id, None)
        return TokenDelta(
            seq.request_id,
            (token,),
            logprobs=(logprob,) if logprob is not None and seq.sampling.logprobs else None,
            finish_reason=seq.finish_reason,
            first_token_time=now if first else None,
            queue_s=(seq.first_scheduled_time or now) - seq.arrival_time if first else None,
        )

    def admit_prefilled(self, request: GenerateRequest, seed: int, first: TokenDelta) -> None:
        """Start decoding a request whose prompt KV already sits in blocks reserved under its id."""
        seq = Sequence(
            request.request_id,
            list(request.prompt_token_ids),
            request.sampling,
            seed,
            arrival_time=request.arrival_time,
            num_computed_tokens=len(request.prompt_token_ids),
        )
        seq.output_token_ids.extend(first.token_ids)
        seq.output_logprobs.extend(first.logprobs or ())
        self.sequences[seq.request_id] = seq
        self.scheduler.add_running(seq)

    def request_seed(self, request: GenerateRequest) -> int:
        return request.sampling.seed if request.sampling.seed is not None else self._rng.getrandbits(63)

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
