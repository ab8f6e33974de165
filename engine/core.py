"""The engine core: scheduler, request table and step loop, over an executor that runs each step's plan.

The core is pure bookkeeping on the host: it decides which sequences and tokens run, in which KV blocks,
and turns sampled tokens into deltas; the executor (engine/executor.py) owns the model, the KV cache and
the devices. Workers drive a core from their engine thread (engine/engine_thread.py) and nothing else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diptych.engine.block_manager import BlockManager
from diptych.engine.config import ModelConfig
from diptych.engine.engine_config import EngineConfig
from diptych.engine.executor import Executor
from diptych.engine.forward_context import KVHook
from diptych.engine.messages import (
    FinishReason,
    GenerateRequest,
    ReserveOutcome,
    ReserveResult,
    TokenDelta,
    duplicate_id_message,
)
from diptych.engine.model_runner import LaunchedStep, SampledTokens, slots_for
from diptych.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from diptych.engine.sequence import Sequence


class RequestError(ValueError):
    """A request the engine cannot take (too long for the context or the cache, duplicate id)."""


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int


class EngineCore:
    """The scheduler, the request table and the step loop over one executor (see the module docstring)."""

    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.device = executor.device
        self.model_config: ModelConfig = executor.model_config
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.blocks = BlockManager(executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, config.chunk_size
            ),
            self.blocks,
        )
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
        """Raise RequestError, with the reason, for a request this engine can never serve as asked."""
        if self._in_use(request.request_id):
            raise RequestError(duplicate_id_message(request.request_id))
        self.check_shape(request)

    def _in_use(self, request_id: str) -> bool:
        """Scheduled, or holding blocks (reserved for KV that is coming, or held for a decode side)."""
        return request_id in self.sequences or self.blocks.has(request_id)

    def check_shape(self, request: GenerateRequest) -> None:
        """check_request without the duplicate-id check (a caller may check first, then reserve)."""
        n = len(request.prompt_token_ids)
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
            return deltas + self._deltas(step.seqs, self.executor.resolve(step))
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
        step = self.executor.launch(out, tables, hook, previous)
        self.scheduler.advance(out)
        return step

    def _resolve_in_flight(self) -> list[TokenDelta]:
        step, self.in_flight = self.in_flight, None
        if step is None:
            return []
        for seq in step.seqs:
            seq.num_pending_tokens -= 1
        return self._deltas(step.seqs, self.executor.resolve(step))

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

    # ---- disaggregated serving: what the prefill and decode workers ask of their core ----

    def load(self) -> EngineLoad:
        s, b = self.scheduler, self.blocks
        return EngineLoad(len(s.running), len(s.waiting), b.num_used_blocks, b.num_blocks)

    def hand_over(self, request_id: str) -> bool:
        """Take a request whose first token is out off the schedule, keeping its KV blocks for the decode
        side to copy; False when it already finished (its blocks are freed)."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, FinishReason.STOP, free_blocks=False)
        return True

    def free_blocks(self, request_id: str) -> None:
        """Free the blocks of a request that is not scheduled (held after hand_over, or reserved)."""
        assert request_id not in self.sequences, f"{request_id} is scheduled: abort it instead"
        self.blocks.free(request_id)

    def reserve(self, request: GenerateRequest) -> ReserveResult:
        """Reserve blocks for a prompt whose KV will arrive from elsewhere, and for its first token."""
        if self._in_use(request.request_id):
            return ReserveResult.duplicate(request.request_id)
        try:
            self.check_shape(request)
        except RequestError as e:
            return ReserveResult(ReserveOutcome.REJECTED, str(e))
        if not self.blocks.reserve(request.request_id, len(request.prompt_token_ids) + 1):
            free, size = self.blocks.num_free_blocks, self.blocks.block_size
            return ReserveResult(ReserveOutcome.NO_FREE_BLOCKS, f"{free} free KV blocks of {size} tokens")
        return ReserveResult(ReserveOutcome.RESERVED)

    def prompt_slots(self, request_id: str, num_tokens: int) -> torch.Tensor:
        """The KV cache slots of positions [0, num_tokens) of a reserved request (int64, on the device)."""
        table = self.blocks.block_table(request_id)
        slots = slots_for(table, 0, num_tokens, self.blocks.block_size)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)
