"""Turns a SchedulerOutput into tensors, runs the model, samples. Owns the model and the KV cache.

A step's host work (scheduling, preparing inputs, reading back tokens) is time the GPU idles unless the
next step is launched before the current one resolves (async scheduling, see LLMEngine.step): `launch`
queues a step's forward and sampling and starts copying its tokens back without waiting; `resolve` waits
for them. A step launched while another is unresolved takes the input ids of the sequences whose tokens
are still pending from that step's device tensor of sampled tokens.

The step's small integer inputs (token ids, positions, slots, sequence bounds, KV lengths, sampled rows,
block tables) are computed with numpy, per sequence rather than per token where the step is a decode, into
one host buffer that reaches the device in one copy (engine.host_staging); the tensors the forward reads
are views of it. When the step will replay a
CUDA graph its decode rows are laid out and padded the way the graph reads them (see engine.cuda_graphs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from diptych.engine.cuda_graphs import DecodeGraphs, decode_input_fields, packed_offsets, unpack
from diptych.engine.forward_context import AttentionMetadata, KVHook, forward_context
from diptych.engine.host_staging import BlockTableMirror, HostStaging, TokenLanding
from diptych.engine.kv_cache import PagedKVCache
from diptych.engine.model import LlamaForCausalLM
from diptych.engine.sampler import SamplerOutput, SamplingBatch, argmax_suffices, greedy_argmax, sample
from diptych.engine.scheduler import ScheduledChunk, SchedulerOutput
from diptych.engine.sequence import Sequence

_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the flat batch whose logits are sampled (last of each chunk)
    samples_every_row: bool = False  # sample_rows is 0..T-1 (any decode step): the logits need no gather
    graph_inputs: torch.Tensor | None = None  # the decode rows packed and padded for DecodeGraphs.replay


@dataclass(frozen=True)
class SampledTokens:
    token_ids: list[int]  # one per sampling chunk, in chunk order
    logprobs: list[float] | None


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device: its sampled tokens are known there, and on their way to the host."""

    seqs: list[Sequence]  # the sampling sequences, in row order
    token_ids: torch.Tensor  # [S] int64 on the device: a step launched before this one resolves reads these
    host_token_ids: torch.Tensor  # [S] the same, landing in host memory
    host_logprobs: torch.Tensor | None  # [S] fp32, when some sequence asked for logprobs
    landed: torch.cuda.Event | None  # recorded after the copies to the host (None: already there, on CPU)

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """id(sequence) -> its row of token_ids."""
        return {id(seq): row for row, seq in enumerate(self.seqs)}


def slots_for(table: Seq[int], start: int, num_tokens: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, start + num_tokens)]


@functools.lru_cache(maxsize=64)  # decode steps repeat a few shapes for many steps
def step_layout(
    rows: int, kv_rows: int, num_seqs: int, num_sampled: int, width: int, num_forwarded: int = 0
) -> tuple[tuple[tuple[int, torch.dtype], ...], tuple[int, ...]]:
    """The (numel, dtype) fields of a step's packed inputs, and their byte offsets (see packed_offsets):
    input ids, positions, slots (rows each) and KV lengths (kv_rows), in the layout a decode graph reads;
    then cu_seqlens_q, sample rows and the block tables, flat; then the rows whose input ids come from the
    previous step followed by their rows there. Rows past the step's own are padding."""
    fields = (
        *decode_input_fields(rows)[:3],
        (kv_rows, torch.int32),
        (num_seqs + 1, torch.int32),
        (num_sampled, torch.int64),
        (num_seqs * width, torch.int32),
        (2 * num_forwarded, torch.int64),
    )
    return fields, tuple(packed_offsets(fields))


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        kv_cache.bind(model)
        self.graphs: DecodeGraphs | None = None
        self.staging = HostStaging(device)
        self.mirror = BlockTableMirror()
        self.landing = TokenLanding(device)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """CUDA only: capture the decode forward; pure-decode steps that fit replay it from now on."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.graphs = DecodeGraphs(self.model, max_num_seqs, -(-max_model_len // self.block_size))

    def prepare(
        self,
        chunks: Seq[ScheduledChunk],
        tables: Seq[Seq[int]],
        kv_hook: KVHook | None = None,
        previous: LaunchedStep | None = None,
    ) -> StepInputs:
        """The step's input tensors. tables[i] is chunks[i]'s block table; a table passed to an earlier
        step as the same object must only have grown at its end since (see BlockTableMirror). A sequence
        with a pending token decodes it: its input id is taken on the device from `previous`, the step
        that sampled it."""
        num_seqs = len(chunks)
        is_decode = all(c.num_tokens == 1 for c in chunks)
        rows, from_rows = forwarded_rows(chunks, previous)
        assert is_decode or not rows, "a pending token can only be decoded, not prefilled"
        num_tokens = num_seqs if is_decode else sum(c.num_tokens for c in chunks)
        width = max(map(len, tables), default=0) or 1
        padded = None
        if self.graphs is not None and is_decode and kv_hook is None:
            padded = self.graphs.padded_size(num_seqs, width)
        sampled = [i for i, c in enumerate(chunks) if c.samples]
        in_order = previous is not None and rows == from_rows == list(range(len(previous.seqs)))
        num_forwarded = 0 if in_order else len(rows)
        fields, offsets = step_layout(
            padded or num_tokens, padded or num_seqs, num_seqs, len(sampled), width, num_forwarded
        )
        host, host_array = self.staging.take(offsets[-1])
        arrays = _numpy_unpack(host_array, fields, offsets)
        self._fill(arrays[:7], chunks, tables, width, num_tokens, sampled)
        arrays[7][:] = rows + from_rows if num_forwarded else []
        packed = self.staging.to_device(host)
        views = unpack(packed, fields, offsets)
        input_ids, positions, slots, kv_lens, cu_seqlens, sample_rows, block_tables, forwarded = views
        if in_order:  # every row decodes the token the previous step sampled in the same row
            assert previous is not None
            input_ids[: len(rows)].copy_(previous.token_ids)
        elif rows:
            assert previous is not None
            input_ids.index_copy_(0, forwarded[: len(rows)], previous.token_ids[forwarded[len(rows) :]])
        if padded:  # the forward outside the graph, and the caller, see the step's rows only
            input_ids, positions, slots = input_ids[:num_tokens], positions[:num_tokens], slots[:num_tokens]
            kv_lens = kv_lens[:num_seqs]
        meta = AttentionMetadata(
            slot_mapping=slots,
            cu_seqlens_q=cu_seqlens,
            kv_lens=kv_lens,
            block_tables=block_tables.view(num_seqs, width),
            is_decode=is_decode,
            kv_hook=kv_hook,
        )
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            meta=meta,
            sample_rows=sample_rows,
            samples_every_row=is_decode and len(sampled) == num_seqs,
            graph_inputs=packed[: offsets[4]] if padded else None,  # ids, positions, slots, kv_lens
        )

    def _fill(
        self,
        arrays: list[np.ndarray],
        chunks: Seq[ScheduledChunk],
        tables: Seq[Seq[int]],
        width: int,
        num_tokens: int,
        sampled: list[int],
    ) -> None:
        """Compute the step's inputs into the packed host arrays (numpy views of the staging buffer)."""
        input_ids, positions, slots, kv_lens, cu_seqlens, sample_rows, block_tables = arrays
        n, t, block_size = len(chunks), num_tokens, self.block_size
        if len(input_ids) > t:
            # Padding rows up to a graph's size: a valid token and position, no KV written, nothing attended.
            input_ids[t:], positions[t:], slots[t:], kv_lens[n:] = 0, 0, -1, 0
            input_ids, positions, slots, kv_lens = input_ids[:t], positions[:t], slots[:t], kv_lens[:n]
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
        if t == n:  # one token per sequence (a decode step): row i is sequence i at its start
            # (a pending token's row is written on the device, from the step that sampled it)
            input_ids[:] = [0 if c.seq.num_pending_tokens else c.seq.token_at(c.start) for c in chunks]
            positions[:] = starts
            np.add(starts, 1, out=kv_lens)
            cu_seqlens[:] = np.arange(n + 1)
            sample_rows[:] = sampled
            token_seq = cu_seqlens[:n]  # 0..n-1
        else:
            counts = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=n)
            input_ids[:] = [token for c in chunks for token in _chunk_tokens(c)]
            np.add(starts, counts, out=kv_lens)
            cu_seqlens[0] = 0
            np.cumsum(counts, out=cu_seqlens[1:])
            sample_rows[:] = cu_seqlens[1:][sampled] - 1
            token_seq = np.repeat(np.arange(n), counts)
            positions[:] = np.arange(t) + np.repeat(starts - cu_seqlens[:-1], counts)
        table_array = block_tables.reshape(n, width)
        lengths = self.mirror.gather(tables, table_array)
        assert (kv_lens <= np.array(lengths) * block_size).all(), "a block table is short of its tokens"
        slots[:] = table_array[token_seq, positions // block_size] * block_size + positions % block_size

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [S, V] (fp32) at the sampled rows."""
        if self.graphs is not None and inputs.graph_inputs is not None:
            hidden = self.graphs.replay(inputs.graph_inputs, inputs.meta.block_tables)
        else:
            with forward_context(inputs.meta):
                hidden = self.model(inputs.input_ids, inputs.positions)
        return self.model.compute_logits(hidden if inputs.samples_every_row else hidden[inputs.sample_rows])

    @torch.inference_mode()
    def launch(
        self,
        out: SchedulerOutput,
        tables: Seq[Seq[int]],
        kv_hook: KVHook | None = None,
        previous: LaunchedStep | None = None,
    ) -> LaunchedStep:
        """Queue the step's forward and sampling, and the copy of its tokens to the host; no waiting."""
        inputs = self.prepare(out.chunks, tables, kv_hook, previous)
        logits = self.forward_logits(inputs)
        seqs = [c.seq for c in out.chunks if c.samples]
        sampled = self.sample(logits, seqs)
        host_ids, host_logprobs, landed = self.landing.send(sampled.token_ids, sampled.logprobs)
        return LaunchedStep(seqs, sampled.token_ids, host_ids, host_logprobs, landed)

    @staticmethod
    def resolve(step: LaunchedStep) -> SampledTokens:
        """The step's tokens on the host: waits for the step to finish."""
        if step.landed is not None:
            step.landed.synchronize()
        logprobs = step.host_logprobs.tolist() if step.host_logprobs is not None else None
        return SampledTokens(step.host_token_ids.tolist(), logprobs)

    def sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """One token for each sequence from its row of logits [S, V], on the device. A sequence's sampling
        step counts its pending tokens, so a seeded draw is the same whether or not the step ran ahead."""
        if not seqs:
            return SamplerOutput(torch.empty(0, dtype=torch.int64, device=logits.device), None)
        params = [s.sampling for s in seqs]
        if argmax_suffices(params):  # what sample() would compute, without building its batch
            return SamplerOutput(greedy_argmax(logits.float()), None)
        batch = SamplingBatch.build(
            params,
            seeds=[s.seed for s in seqs],
            steps=[s.num_output_tokens for s in seqs],
            device=self.device,
        )
        return sample(logits, batch)


def forwarded_rows(chunks: Seq[ScheduledChunk], previous: LaunchedStep | None) -> tuple[list[int], list[int]]:
    """The rows of a step whose sequences decode a pending token, and each one's row in `previous`."""
    if previous is None:
        return [], []
    rows, from_rows = [], []
    for row, chunk in enumerate(chunks):
        if chunk.seq.num_pending_tokens:
            rows.append(row)
            from_rows.append(previous.rows[id(chunk.seq)])
    return rows, from_rows


def _numpy_unpack(
    buffer: np.ndarray, fields: Seq[tuple[int, torch.dtype]], offsets: Seq[int]
) -> list[np.ndarray]:
    """unpack() for the host's numpy view of the same buffer."""
    typed = {dtype: buffer.view(_NUMPY_DTYPES[dtype]) for dtype in _NUMPY_DTYPES}
    return [
        typed[dtype][start // dtype.itemsize : start // dtype.itemsize + numel]
        for start, (numel, dtype) in zip(offsets, fields)
    ]


def _chunk_tokens(chunk: ScheduledChunk) -> list[int]:
    start, end, seq = chunk.start, chunk.start + chunk.num_tokens, chunk.seq
    prompt = seq.prompt_token_ids
    return prompt[start:end] if end <= len(prompt) else seq.all_token_ids[start:end]
