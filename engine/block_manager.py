"""Paged KV block accounting: reference counts, back-pressure, chained content hashes. Pure Python.

A sequence owns a block table (a list of block ids). Full blocks carry a hash chained over all previous
blocks' content, so a block with a given hash always holds the same tokens at the same positions; with
prefix caching on, a new prompt reuses the blocks whose hashes match its leading full blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


def chain_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one full block's tokens, chained to its parent block's hash (stable across processes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", -1 if parent is None else parent))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None


@dataclass
class _Table:
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading blocks whose content hash is recorded
    last_hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached: dict[int, int] = {}  # content hash -> block id
        self.tables: dict[str, _Table] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self.tables[seq_id].block_ids

    def has(self, seq_id: str) -> bool:
        return seq_id in self.tables

    def allocate_prompt(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """Start a table for a new sequence, reusing cached prefix blocks when prefix caching is on.

        Returns the number of leading tokens whose KV is already cached (a multiple of block_size, and always
        short of the whole prompt so at least one token is computed), or None when blocks run out.
        """
        assert seq_id not in self.tables, f"sequence {seq_id} already has blocks"
        hits = self._match_prefix(token_ids) if self.enable_prefix_caching else []
        if len(hits) * self.block_size >= len(token_ids):
            hits = hits[:-1]
        fresh = self.blocks_for(len(token_ids)) - len(hits)
        reclaimable = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh + reclaimable > len(self.free_ids):
            return None
        table = _Table()
        for block_id in hits:
            self._take(block_id)
            table.block_ids.append(block_id)
            table.last_hash = self.blocks[block_id].content_hash
        table.num_hashed = len(hits)
        table.block_ids.extend(self._pop_free() for _ in range(fresh))
        self.tables[seq_id] = table
        return len(hits) * self.block_size

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        """Grow (or create) a table to hold num_tokens tokens. False, changing nothing, on back-pressure."""
        table = self.tables.setdefault(seq_id, _Table())
        need = self.blocks_for(num_tokens) - len(table.block_ids)
        if need > len(self.free_ids):
            if not table.block_ids:
                del self.tables[seq_id]
            return False
        table.block_ids.extend(self._pop_free() for _ in range(need))
        return True

    def commit(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Record content hashes of the blocks that token_ids (the sequence so far, KV computed) fill."""
        table = self.tables[seq_id]
        full = min(len(token_ids) // self.block_size, len(table.block_ids))
        for i in range(table.num_hashed, full):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            table.last_hash = chain_hash(table.last_hash, chunk)
            block = self.blocks[table.block_ids[i]]
            if block.content_hash is None and table.last_hash not in self.cached:
                block.content_hash = table.last_hash
                self.cached[table.last_hash] = block.block_id
        table.num_hashed = max(table.num_hashed, full)

    def free(self, seq_id: str) -> int:
        """Drop a sequence's table; returns how many blocks went back to the free list."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return 0
        released = 0
        # Free in reverse so the earliest (most shareable) prefix blocks are evicted last.
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self.free_ids.append(block_id)
                released += 1
        return released

    def _match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        hits: list[int] = []
        parent: int | None = None
        for i in range(len(token_ids) // self.block_size):
            parent = chain_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_ids.remove(block_id)
        block.ref_count += 1

    def _pop_free(self) -> int:
        block = self.blocks[self.free_ids.popleft()]
        if block.content_hash is not None:  # evict: its content is about to be overwritten
            del self.cached[block.content_hash]
            block.content_hash = None
        block.ref_count = 1
        return block.block_id
