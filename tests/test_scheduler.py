"""The pure-Python scheduler: token budget, chunking, continuous batching, preemption, stop conditions."""

from __future__ import annotations

from diptych.engine.block_manager import BlockManager
from diptych.engine.messages import FinishReason, SamplingParams
from diptych.engine.scheduler import Scheduler, SchedulerConfig
from diptych.engine.sequence import SeqStatus, Sequence


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, budget: int = 16, max_seqs: int = 8
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_seqs, budget, max_model_len=256), BlockManager(num_blocks, block_size)
    )


def make_seq(name: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), seed=0)


def run_step(s: Scheduler, token: int = 7) -> list[tuple[str, int, int]]:
    out = s.schedule()
    s.advance(out)
    for c in out.chunks:
        if c.samples:
            s.append_token(c.seq, token, eos_token_ids=(0,))
    return [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]


def test_prefill_is_chunked_under_the_budget_and_decodes_join() -> None:
    s = make_scheduler(budget=10)
    s.add(make_seq("a", 23))
    assert run_step(s) == [("a", 0, 10)]
    s.add(make_seq("b", 5))
    assert run_step(s) == [("a", 10, 10)]  # a takes the whole budget first
    assert run_step(s) == [("a", 20, 3), ("b", 0, 5)]  # a finishes its prompt and samples; b joins
    assert run_step(s) == [("a", 23, 1), ("b", 5, 1)]  # both decode


def test_max_num_seqs_caps_the_running_set() -> None:
    s = make_scheduler(max_seqs=2, budget=100)
    for name in "abc":
        s.add(make_seq(name, 3))
    assert [r for r, _, _ in run_step(s)] == ["a", "b"]
    assert [seq.request_id for seq in s.waiting] == ["c"]


def test_preemption_frees_blocks_and_recomputes_later() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, budget=100)
    s.add(make_seq("a", 7, max_tokens=8))
    s.add(make_seq("b", 7, max_tokens=8))
    run_step(s)  # both prefilled (7 tokens: 2 blocks each, cache full) and sampled their 8th token
    run_step(s)  # the 8th token's KV still fits in 2 blocks
    out = s.schedule()  # a's 9th token needs a third block: b (the newest) is preempted
    assert out.preempted == ["b"]
    assert [c.seq.request_id for c in out.chunks] == ["a"]
    b = s.waiting[0]
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert not s.blocks.has("b")
    s.advance(out)


def test_stop_conditions_and_blocks_return_to_idle() -> None:
    s = make_scheduler()
    a, b = make_seq("a", 5, max_tokens=3), make_seq("b", 5, max_tokens=10)
    s.add(a)
    s.add(b)
    while s.has_work():
        out = s.schedule()
        s.advance(out)
        for c in out.chunks:
            if c.samples:
                s.append_token(c.seq, 0 if c.seq is b and len(b.output_token_ids) == 1 else 5, (0,))
    assert a.finish_reason is FinishReason.LENGTH and len(a.output_token_ids) == 3
    assert b.finish_reason is FinishReason.STOP and b.output_token_ids[-1] == 0
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_finish_while_waiting_or_running_frees_everything() -> None:
    s = make_scheduler(budget=4)
    a, b = make_seq("a", 9), make_seq("b", 3)
    s.add(a)
    s.add(b)
    run_step(s)  # a partly prefilled
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert not s.has_work() and s.blocks.num_free_blocks == s.blocks.num_blocks
