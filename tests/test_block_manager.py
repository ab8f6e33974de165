"""Block manager: back-pressure, exact free, reference counts, the content-hash chain, prefix reuse."""

from __future__ import annotations

import subprocess
import sys

from diptych.engine.block_manager import BlockManager, chain_hash


def test_back_pressure_returns_none_or_false_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.allocate_prompt("a", list(range(13))) == 0  # 4 blocks
    assert bm.num_free_blocks == 1
    assert bm.allocate_prompt("b", list(range(8))) is None  # needs 2
    assert not bm.has("b") and bm.num_free_blocks == 1
    assert bm.reserve("a", 20) is True  # 5 blocks
    assert bm.reserve("a", 21) is False  # would need a 6th
    assert len(bm.block_table("a")) == 5 and bm.num_free_blocks == 0
    assert bm.reserve("c", 1) is False and not bm.has("c")


def test_free_returns_exactly_what_was_taken() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.allocate_prompt("a", list(range(10)))
    bm.reserve("a", 12)
    bm.reserve("b", 9)
    taken_a = set(bm.block_table("a"))
    taken_b = set(bm.block_table("b"))
    assert not taken_a & taken_b
    assert bm.free("a") == len(taken_a) == 3
    assert bm.free("b") == 3
    assert bm.free("b") == 0  # freeing twice is a no-op
    assert bm.num_free_blocks == 16 and sorted(bm.free_ids) == list(range(16))
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_hash_chain_depends_on_every_previous_block() -> None:
    h1 = chain_hash(None, [1, 2, 3, 4])
    assert chain_hash(None, [1, 2, 3, 4]) == h1
    assert chain_hash(h1, [5, 6, 7, 8]) != chain_hash(chain_hash(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    assert chain_hash(None, [5, 6, 7, 8]) != chain_hash(h1, [5, 6, 7, 8])


def test_hash_is_stable_across_processes() -> None:
    """Prefill and decode workers must agree on a block's hash (no per-process hash seed)."""
    code = "from engine.block_manager import chain_hash; print(chain_hash(None, [9, 8, 7]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == chain_hash(None, [9, 8, 7])


def test_prefix_reuse_shares_blocks_with_reference_counts() -> None:
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    prompt = list(range(100, 111))  # 2 full blocks + 3 tokens
    assert bm.allocate_prompt("a", prompt) == 0
    bm.commit("a", prompt)
    shared = bm.block_table("a")[:2]
    assert bm.allocate_prompt("b", [*prompt[:8], 1, 2]) == 8  # both full blocks hit
    assert bm.block_table("b")[:2] == shared
    assert [bm.blocks[i].ref_count for i in shared] == [2, 2]
    # A prompt that is exactly the cached blocks still computes its last token.
    assert bm.allocate_prompt("c", prompt[:8]) == 4
    assert bm.allocate_prompt("d", [7, *prompt[1:8]]) == 0  # first block differs: no hit at all
    for s in "abcd":
        bm.free(s)
    assert bm.num_free_blocks == 12 and all(b.ref_count == 0 for b in bm.blocks)


def test_freed_cached_blocks_are_reused_until_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    bm.allocate_prompt("a", [1, 2, 3, 4, 5])
    bm.commit("a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.allocate_prompt("b", [1, 2, 3, 4, 9]) == 4  # hits blocks sitting in the free list
    bm.free("b")
    bm.allocate_prompt("c", [8] * 8)  # takes every block: evicts the cached ones
    bm.free("c")
    assert bm.allocate_prompt("d", [1, 2, 3, 4, 9]) == 0
    assert not bm.cached or all(bm.blocks[b].content_hash == h for h, b in bm.cached.items())
