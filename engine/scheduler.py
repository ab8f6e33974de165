"""Chunked prefill under a token budget plus continuous batching of decodes. Pure Python (no torch).

Each step serves running sequences first (decodes and unfinished prefill chunks, oldest first), then admits
waiting ones while the token budget, the sequence cap and free blocks allow. When blocks run out for a
running sequence, the newest running sequence is preempted: its blocks are freed and it is recomputed
from its prompt and output so far once admitted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from diptych.engine.block_manager import BlockManager
from diptych.engine.messages import FinishReason
from diptych.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # the per-step token budget, shared by prefill chunks and decodes
    max_model_len: int = 8192
    chunk_size: int | None = None  # most prompt tokens of one sequence per step (None: the whole budget)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the known tokens, so the step samples the next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        return bool(self.chunks) and all(c.num_tokens == 1 for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        cap = self.config.chunk_size or budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted by an older sequence this step, or out of budget
            if seq.num_pending_tokens and self._at_length_limit(seq, seq.num_output_tokens, seq.num_tokens):
                continue  # its last token is still on the device: nothing left to compute
            n = min(seq.num_uncomputed, budget, cap)
            while not self.blocks.reserve(seq.request_id, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            cached = self.blocks.allocate_prompt(seq.request_id, seq.all_token_ids)
            if cached is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.num_computed_tokens = cached
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget, cap)
            chunks.append(ScheduledChunk(seq, cached, n))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the step in flight resolves (async scheduling):
        nothing waits and every running sequence decodes one token into blocks free now, so the schedule
        neither prefills nor preempts. A pending token's value is unknown here, so it can be neither part of
        a prefill chunk nor recomputed after a preemption."""
        if self.waiting:
            return False
        need = 0
        for seq in self.running:
            if seq.num_uncomputed != 1:
                return False
            have = len(self.blocks.block_table(seq.request_id))
            need += max(0, self.blocks.blocks_for(seq.num_computed_tokens + 1) - have)
        return need <= self.blocks.num_free_blocks

    def _at_length_limit(self, seq: Sequence, num_output: int, num_tokens: int) -> bool:
        """num_output generated tokens, num_tokens in all, are as many as max_tokens or the context allow."""
        return num_output >= seq.sampling.max_tokens or num_tokens >= self.config.max_model_len

    def advance(self, output: SchedulerOutput) -> None:
        """The step ran: its chunks' KV is in the cache."""
        for chunk in output.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if self.blocks.enable_prefix_caching:
                self.blocks.commit(
                    chunk.seq.request_id, chunk.seq.all_token_ids[: chunk.seq.num_computed_tokens]
                )

    def append_token(self, seq: Sequence, token_id: int, eos_token_ids: tuple[int, ...]) -> bool:
        """Add a sampled token; True if that finishes the sequence. Tokens still pending do not count: the
        limits are checked on the known ones, each in its turn."""
        seq.output_token_ids.append(token_id)
        params = seq.sampling
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
            self.finish(seq, FinishReason.STOP)
        elif self._at_length_limit(seq, len(seq.output_token_ids), seq.num_tokens - seq.num_pending_tokens):
            self.finish(seq, FinishReason.LENGTH)
        return seq.is_finished

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose prompt KV is already in its reserved blocks (it arrived from a prefill
        worker): it joins the running set directly and decodes from its next token."""
        assert self.blocks.has(seq.request_id), "a prefilled sequence needs its reserved blocks"
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason, free_blocks: bool = True) -> None:
        """Take a sequence out of the schedule; free_blocks=False keeps its KV (a prefill worker holds it
        until the decode worker confirms receipt)."""
        if seq.is_finished:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.blocks.free(seq.request_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
