"""Async scheduling: a decode step launched before the previous one's tokens reach the host must give
exactly what the serial engine gives (tokens, logprobs, finish reasons), return every KV block, and survive
aborts, stops, new arrivals and preemption in between. The serial engine is the reference."""

from __future__ import annotations

import torch

from diptych.engine.block_manager import BlockManager
from diptych.engine.kv_cache import kv_block_bytes
from diptych.engine.llm_engine import LLMEngine
from diptych.engine.messages import FinishReason, GenerateRequest, SamplingParams, TokenDelta
from diptych.engine.scheduler import Scheduler, SchedulerConfig
from diptych.engine.sequence import Sequence
from tests.factories import make_engine, make_prompts

VOCAB = 384


def run(engine: LLMEngine, arrivals: dict[int, list[GenerateRequest]], abort_at: dict[int, str]) -> dict:
    """Drive engine.step() by hand: requests join at the given step, aborts happen at the given step.
    Returns each request's deltas joined, and how many steps ended with a step in flight."""
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    finish: dict[str, FinishReason | None] = {}
    ran_ahead = 0
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request in arrivals.get(step, []):
            engine.add_request(request)
            tokens[request.request_id], logprobs[request.request_id] = [], []
        if step in abort_at and abort_at[step] in engine.sequences:
            engine.abort_request(abort_at[step])
            finish[abort_at[step]] = FinishReason.ABORT
        for delta in engine.step():
            collect(delta, tokens, logprobs, finish)
        ran_ahead += engine.in_flight is not None
        step += 1
        assert step < 1000, "the engine never finished"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "KV blocks leaked"
    assert engine.in_flight is None and not engine.sequences
    return {"tokens": tokens, "logprobs": logprobs, "finish": finish, "ran_ahead": ran_ahead}


def collect(
    delta: TokenDelta,
    tokens: dict[str, list[int]],
    logprobs: dict[str, list[float]],
    finish: dict[str, FinishReason | None],
) -> None:
    assert finish.get(delta.request_id) is None, f"a delta for {delta.request_id} after it finished"
    tokens[delta.request_id].extend(delta.token_ids)
    logprobs[delta.request_id].extend(delta.logprobs or ())
    if delta.finish_reason is not None:
        finish[delta.request_id] = delta.finish_reason


def workload(stop_tokens: dict[int, int] | None = None) -> dict[int, list[GenerateRequest]]:
    """Greedy, seeded random (top-k, top-p, min-p), logprobs, different lengths; two requests arrive
    while the first ones decode, so the engine passes between running ahead and serial steps."""
    prompts = make_prompts([5, 17, 9, 30, 12, 7], VOCAB, seed=11)
    stops = stop_tokens or {}
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=13, temperature=0.9, top_k=40, seed=5, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=25, temperature=1.1, top_p=0.8, seed=6, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.7, min_p=0.05, seed=7, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=11, temperature=1.0, seed=8, ignore_eos=True),
    ]
    params = [
        SamplingParams(**{**p.__dict__, "stop_token_ids": (stops[i],)}) if i in stops else p
        for i, p in enumerate(params)
    ]
    requests = [
        GenerateRequest(f"r{i}", tuple(prompt), p) for i, (prompt, p) in enumerate(zip(prompts, params))
    ]
    return {0: requests[:4], 5: requests[4:5], 9: requests[5:]}


def test_running_ahead_gives_the_serial_engines_tokens_logprobs_and_finish(tiny_llama_dir: str) -> None:
    serial = run(make_engine(tiny_llama_dir, async_scheduling=False), workload(), {})
    ahead = run(make_engine(tiny_llama_dir, async_scheduling=True), workload(), {})
    assert serial["ran_ahead"] == 0 and ahead["ran_ahead"] > 10
    assert ahead["tokens"] == serial["tokens"]
    assert ahead["finish"] == serial["finish"] == {f"r{i}": FinishReason.LENGTH for i in range(6)}
    for rid, values in serial["logprobs"].items():
        torch.testing.assert_close(ahead["logprobs"][rid], values)
    assert [len(serial["logprobs"][r]) for r in ("r1", "r3", "r4")] == [13, 9, 16]


def test_a_stop_token_ends_a_sequence_whose_next_step_already_ran(tiny_llama_dir: str) -> None:
    """Stop tokens picked from the serial run's own output, mid-sequence: running ahead launches the
    sequence once more before the host sees its stop token; that token must be dropped."""
    first = run(make_engine(tiny_llama_dir, async_scheduling=False), workload(), {})
    stops = {i: first["tokens"][f"r{i}"][k] for i, k in ((0, 6), (2, 3), (4, 10))}
    serial = run(make_engine(tiny_llama_dir, async_scheduling=False), workload(stops), {})
    ahead = run(make_engine(tiny_llama_dir, async_scheduling=True), workload(stops), {})
    assert ahead["tokens"] == serial["tokens"]
    assert ahead["finish"] == serial["finish"]
    stopped = {rid for rid, reason in serial["finish"].items() if reason == FinishReason.STOP}
    assert {"r0", "r2", "r4"} <= stopped
    assert all(len(serial["tokens"][rid]) < len(first["tokens"][rid]) for rid in ("r0", "r2", "r4"))


def test_an_abort_while_a_token_is_in_flight_returns_its_blocks(tiny_llama_dir: str) -> None:
    aborts = {7: "r2", 12: "r0"}
    serial = run(make_engine(tiny_llama_dir, async_scheduling=False), workload(), aborts)
    ahead = run(make_engine(tiny_llama_dir, async_scheduling=True), workload(), aborts)
    assert ahead["finish"]["r2"] == ahead["finish"]["r0"] == FinishReason.ABORT
    for rid in ("r1", "r3", "r4", "r5"):  # the others are not disturbed
        assert ahead["tokens"][rid] == serial["tokens"][rid]
    # The aborted ones got a prefix of their serial tokens: running ahead, fewer tokens have reached the
    # host by the same step, and the one in flight at the abort is dropped.
    for rid in ("r0", "r2"):
        got, want = ahead["tokens"][rid], serial["tokens"][rid]
        assert 0 < len(got) <= len(want) and got == want[: len(got)]


def test_a_cache_too_small_to_run_ahead_falls_back_to_serial_steps_and_preemption(
    tiny_llama_dir: str,
) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = make_prompts([6, 14, 25, 19], VOCAB, seed=3)
    roomy = make_engine(tiny_llama_dir, async_scheduling=False).generate(prompts, params)
    block_bytes = kv_block_bytes(make_engine(tiny_llama_dir).model_config, 4, torch.float32)
    tight_engine = make_engine(tiny_llama_dir, async_scheduling=True, kv_cache_gib=30 * block_bytes / 2**30)
    tight = tight_engine.generate(prompts, params)
    assert [s.output_token_ids for s in tight] == [s.output_token_ids for s in roomy]
    assert sum(s.num_preemptions for s in tight) > 0
    assert tight_engine.blocks.num_free_blocks == tight_engine.blocks.num_blocks


def decoding(request_id: str, prompt_len: int, max_tokens: int, blocks: BlockManager) -> Sequence:
    seq = Sequence(request_id, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), seed=0)
    seq.output_token_ids.append(1)
    seq.num_computed_tokens = prompt_len
    assert blocks.reserve(request_id, prompt_len)
    return seq


def test_the_scheduler_runs_ahead_only_over_decodes_that_fit_without_preempting() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), blocks
    )
    a, b = decoding("a", 4, 10, blocks), decoding("b", 7, 10, blocks)  # a needs a new block, b does not
    scheduler.add_running(a)
    scheduler.add_running(b)
    assert blocks.num_free_blocks == 2 and scheduler.can_schedule_ahead()
    c = decoding("c", 8, 10, blocks)  # takes 2 blocks: a's next block is no longer free
    scheduler.add_running(c)
    assert blocks.num_free_blocks == 0 and not scheduler.can_schedule_ahead()
    scheduler.finish(c, FinishReason.ABORT)
    assert scheduler.can_schedule_ahead()
    scheduler.add(Sequence("w", [1, 2, 3], SamplingParams(), seed=0))
    assert not scheduler.can_schedule_ahead(), "a waiting sequence must be prefilled by a serial step"


def test_a_sequence_whose_last_token_is_pending_is_not_scheduled_again() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), blocks
    )
    last, more = decoding("last", 5, 2, blocks), decoding("more", 5, 3, blocks)
    for seq in (last, more):
        scheduler.add_running(seq)
        seq.num_computed_tokens += 1  # the step in flight decodes the known output token...
        seq.num_pending_tokens = 1  # ...and samples the next, which is "last"'s second and final one
        assert blocks.reserve(seq.request_id, seq.num_computed_tokens + 1)
    assert [c.seq for c in scheduler.schedule().chunks] == [more]
    # Resolving it: the known tokens decide the finish, not the pending ones.
    last.num_pending_tokens = 0
    assert scheduler.append_token(last, 9, eos_token_ids=(2,))
    assert last.finish_reason == FinishReason.LENGTH and last.output_token_ids == [1, 9]
    more.num_pending_tokens = 1
    assert not scheduler.append_token(more, 9, eos_token_ids=(2,)), "2 known of 3, one still pending"
