"""Batched, seeded token sampling on the logits' device.

Randomness comes from a counter-based hash of (seed, step, vocab index), not from a torch.Generator, so a
request's tokens depend only on its own seed and logits: not on batch order, batch composition, or whether
the prefill or the decode worker sampled them. The draw is the exponential race: with q ~ Exp(1) i.i.d. per
token, argmax(probs / q) is distributed as probs.

Ties at a cut-off are kept: top-k keeps every token whose scaled logit equals the k-th largest, and top-p
keeps every token tied with the last token of the smallest nucleus, so a tie can only widen a cut, never make
it depend on sort order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diptych.engine.messages import SamplingParams

# Temperatures below this are greedy: dividing by them would overflow fp32 logits (vLLM uses the same cut).
GREEDY_TEMPERATURE = 1e-5


def _signed(x: int) -> int:
    """The int64 (two's complement) value with the same low 64 bits as x."""
    return (x + 2**63) % 2**64 - 2**63


# splitmix64 constants (Steele, Lea, Flood 2014), as signed int64 so torch accepts them as scalars.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def argmax_suffices(params: Sequence[SamplingParams]) -> bool:
    """Every row is greedy and none asks for logprobs: sample() would return logits.argmax(-1) and nothing
    else, so a step need not build a SamplingBatch (and copy it to the device) at all."""
    return all(p.temperature < GREEDY_TEMPERATURE and not p.logprobs for p in params)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: Tensor  # [B] fp32, 0 = greedy
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] fp32
    min_p: Tensor  # [B] fp32
    seeds: Tensor  # [B] int64, the request seed modulo 2**64
    steps: Tensor  # [B] int64, index of the sampled token within the request's output
    want_logprobs: bool  # any row asked for logprobs
    all_greedy: bool  # every row is greedy: plain argmax
    any_top_k_top_p: bool  # some random row cuts by top-k or top-p: the step needs a sort
    any_min_p: bool  # some random row cuts by min-p

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        device: torch.device,
    ) -> SamplingBatch:
        assert len(params) == len(seeds) == len(steps), "one seed and one step per request"
        temps = [p.temperature if p.temperature >= GREEDY_TEMPERATURE else 0.0 for p in params]
        random_rows = [p for p, t in zip(params, temps, strict=True) if t > 0.0]
        # Two host-to-device copies per step rather than six.
        floats = torch.tensor(
            [temps, [p.top_p for p in params], [p.min_p for p in params]], dtype=torch.float32
        )
        ints = torch.tensor(
            [[p.top_k for p in params], [_signed(s) for s in seeds], list(steps)], dtype=torch.int64
        )
        temperature, top_p, min_p = floats.to(device).unbind(0)
        top_k, seed, step = ints.to(device).unbind(0)
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seeds=seed,
            steps=step,
            want_logprobs=any(p.logprobs for p in params),
            all_greedy=not random_rows,
            any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in random_rows),
            any_min_p=any(p.min_p > 0.0 for p in random_rows),
        )


# Rows at most this many, and at least this wide, take greedy_argmax's two passes on a GPU.
MAX_TWO_PASS_ROWS = 16
MIN_TWO_PASS_VOCAB = 1 << 14
TWO_PASS_CHUNKS = range(32, 65)  # chunk counts tried, in order, for one that divides the vocabulary


def greedy_argmax(logits: Tensor) -> Tensor:
    """logits.argmax(-1) of [B, V]: the first index of each row's maximum (NaN counting as the maximum).

    torch's one-pass reduction of a single 128K row took 27 us on an H200, most of a decode step's sampling.
    A few rows of a wide vocabulary are split instead into C equal chunks, whose maxima are taken in
    parallel (16 us there, plus two small launches for the argmax over the chunks and the gather): the
    first chunk holding the row maximum, and the first index of it there, is the first index overall.
    Where no C in TWO_PASS_CHUNKS divides V, one pass.
    """
    rows, vocab = logits.shape
    if not logits.is_cuda or rows > MAX_TWO_PASS_ROWS or vocab < MIN_TWO_PASS_VOCAB:
        return logits.argmax(dim=-1)
    chunks = next((c for c in TWO_PASS_CHUNKS if vocab % c == 0), None)
    if chunks is None:
        return logits.argmax(dim=-1)
    return chunked_argmax(logits, chunks)


def chunked_argmax(logits: Tensor, chunks: int) -> Tensor:
    """argmax(-1) of [B, V] as the argmax over `chunks` equal chunks' maxima (V divisible by chunks)."""
    rows, vocab = logits.shape
    chunk_max, index_in_chunk = logits.view(rows, chunks, vocab // chunks).max(dim=-1)
    chunk = chunk_max.argmax(dim=-1, keepdim=True)
    return (chunk * (vocab // chunks) + index_in_chunk.gather(1, chunk)).squeeze(1)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] fp32, log_softmax of the raw logits at the chosen token, when asked


def sample(logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row of logits [B, V] (any float dtype)."""
    assert logits.dim() == 2 and logits.shape[0] == batch.temperature.shape[0], "logits must be [B, V]"
    logits = logits.float()
    greedy_ids = greedy_argmax(logits)
    if batch.all_greedy:
        token_ids = greedy_ids
    else:
        race = _compiled_race() if logits.is_cuda else _exponential_race
        # The compiled race is guarded on the grad mode and on whether its inputs are inference tensors:
        # called in another mode, or on tensors made in another mode, than at its warm-up, it would
        # recompile mid-serving (seconds; found in the disagg bench). So: always inference mode and tensors.
        with torch.inference_mode():
            seeds, steps = (t if t.is_inference() else t.clone() for t in (batch.seeds, batch.steps))
            counter = _counters(logits.shape[-1], logits.device)
            random_ids = race(_masked_scaled_logits(logits, batch), seeds, steps, counter)
        token_ids = torch.where(batch.temperature == 0.0, greedy_ids, random_ids)
    logprobs = _chosen_logprobs(logits, token_ids) if batch.want_logprobs else None
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def _masked_scaled_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Logits / temperature with every token outside top-k, top-p and min-p set to -inf."""
    # Greedy rows divide by 1: their random pick is discarded, but must not produce inf or NaN.
    temperature = torch.where(batch.temperature > 0.0, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    threshold = torch.full_like(batch.temperature, -math.inf)
    if batch.any_top_k_top_p:
        threshold = _top_k_top_p_cutoff(scaled, batch.top_k, batch.top_p)
    if batch.any_min_p:
        # p_i >= min_p * p_max, in log space: no softmax needed; min_p = 0 gives -inf, no cut.
        floor = scaled.max(dim=-1).values + torch.log(batch.min_p)
        threshold = torch.maximum(threshold, floor)
    # Every threshold is <= the row's max, so the top token always survives.
    return scaled.masked_fill(scaled < threshold[:, None], -math.inf)


def _top_k_top_p_cutoff(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """[B] smallest scaled logit kept by top-k then top-p (top-p on the top-k renormalised distribution)."""
    vocab = scaled.shape[-1]
    ordered = scaled.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(-1, (k - 1)[:, None])
    probs = ordered.masked_fill(ordered < kth, -math.inf).softmax(dim=-1)
    # The nucleus ends at the first token whose inclusive cumulative mass reaches top_p. Clamping to k
    # covers top_p = 1 and rounding that leaves the total just under top_p.
    in_nucleus = (probs.cumsum(dim=-1) < top_p[:, None]).sum(dim=-1) + 1
    keep = torch.where(top_p < 1.0, torch.minimum(in_nucleus, k), k)
    return ordered.gather(-1, (keep - 1)[:, None]).squeeze(-1)


def _exponential_race(masked: Tensor, seeds: Tensor, steps: Tensor, counter: Tensor) -> Tensor:
    """argmax(probs / q), q ~ Exp(1), taken as argmax(logits - log q): the same winner, with no probability
    underflowing to 0 and no softmax pass."""
    log_q = torch.log(-torch.log(_uniforms(_stream_keys(seeds, steps), counter))).float()
    return (masked - log_q).argmax(dim=-1)


def warm_up(vocab_size: int, device: torch.device) -> None:
    """Compile the CUDA sampling race now, for one row and for several: dynamic shapes still specialise a
    batch of one, so the first step that samples two rows would otherwise compile mid-serving and stall
    its worker (and every request queued behind it) for seconds. A no-op on CPU."""
    if device.type != "cuda":
        return
    for rows in (1, 2):
        params = [SamplingParams(temperature=1.0) for _ in range(rows)]
        batch = SamplingBatch.build(params, [0] * rows, [0] * rows, device)
        sample(torch.zeros(rows, vocab_size, device=device), batch)


@functools.cache
def _compiled_race() -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """On CUDA one fused reduction replaces ~30 launches and ~20 passes over a [B, V] int64 tensor. Built on
    first use: torch.compile imports dynamo, seconds that CPU-only processes need not pay."""
    return torch.compile(_exponential_race, dynamic=True)


def _chosen_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    chosen = logits.gather(-1, token_ids[:, None]).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def hash_uniforms(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """[B, V] fp64 uniforms in (0, 1); entry (b, v) depends only on (seeds[b], steps[b], v)."""
    return _uniforms(_stream_keys(seeds, steps), _counters(vocab_size, seeds.device))


def _stream_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """[B] int64 key of the splitmix64 stream that serves one (seed, step)."""
    return mix64(mix64(seeds) + steps * _GOLDEN)


def _counters(vocab_size: int, device: torch.device) -> Tensor:
    # Built outside the compiled race: inductor folds an arange times a 64-bit constant into int32 index math.
    return torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device) * _GOLDEN


def _uniforms(stream: Tensor, counter: Tensor) -> Tensor:
    """Output v of stream b is mix64(key_b + (v + 1) * golden), as in splitmix64."""
    return unit_interval(mix64(stream[:, None] + counter[None, :]))


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication and addition wrap modulo 2**64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def unit_interval(bits: Tensor) -> Tensor:
    """Map int64 random bits to fp64 in (0, 1), both ends excluded, so -log never gives inf or 0."""
    # The top 52 bits plus one half is an odd multiple of 2**-53: exact in fp64, within [2**-53, 1 - 2**-53].
    return (_shift_right(bits, 12).double() + 0.5) * 2.0**-52


def _shift_right(z: Tensor, n: int) -> Tensor:
    """Logical right shift: torch's >> on int64 copies the sign bit, so mask it back off."""
    return (z >> n) & ((1 << (64 - n)) - 1)
