"""The host side of a step's transfers: the pinned buffers its inputs go to the device from, the pinned
buffers its sampled tokens land in, and a mirror of the block tables so a step converts only what changed.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

STAGING_DEPTH = 4  # pinned host buffers in turn: a step reuses one only after its copy has finished


class HostStaging:
    """Host buffers that a step's packed inputs are written into, and their way to the device.

    On CUDA: a ring of pinned buffers, so the copy can be asynchronous; a buffer is written again only after
    the copy that last read it has finished (an event per buffer). On CPU: a fresh buffer per step, which the
    step then reads in place (no copy at all), so no step's tensors are overwritten by the next."""

    def __init__(self, device: torch.device, depth: int = STAGING_DEPTH) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers: list[tuple[torch.Tensor, np.ndarray] | None] = [None] * depth
        self.events = [torch.cuda.Event() for _ in range(depth)] if self.pinned else []
        self.turn = 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, np.ndarray]:
        """A uint8 host buffer of nbytes, as a tensor and as a numpy array over the same memory."""
        if not self.pinned:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            return buffer, buffer.numpy()
        self.turn = (self.turn + 1) % len(self.buffers)
        self.events[self.turn].synchronize()  # returns at once for an event never recorded
        held = self.buffers[self.turn]
        if held is None or held[0].numel() < nbytes:
            size = max(nbytes, 2 * held[0].numel() if held else 4096)
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            held = self.buffers[self.turn] = (buffer, buffer.numpy())
        return held[0][:nbytes], held[1][:nbytes]

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The buffer last taken, on the device: one asynchronous copy on CUDA, the buffer itself on CPU."""
        if not self.pinned:
            return host
        staged = host.to(self.device, non_blocking=True)
        self.events[self.turn].record()
        return staged


class BlockTableMirror:
    """The last step's block tables as rows of one numpy array, so that a step converts only the block ids
    appended since (a decoding sequence gains one per block_size tokens), not every table's Python ints.

    A table is recognised by identity. Handed in again as the same object, it must only have grown at its
    end, as BlockManager's tables do; any other table is converted in full. Tables absent from a step are
    forgotten, so the mirror holds references to at most one step's tables."""

    def __init__(self) -> None:
        self.array = np.zeros((8, 64), dtype=np.int32)  # entries past a row's table length are 0
        # id(table) -> (row, length, table). Holding the table keeps its id from passing to a new object.
        self.rows: dict[int, tuple[int, int, Seq[int]]] = {}

    def gather(self, tables: Seq[Seq[int]], out: np.ndarray) -> list[int]:
        """Write the tables into out [len(tables), width], zero-padded; returns their lengths."""
        self._reserve(len(tables), out.shape[1])
        previous, current = self.rows, {}
        for table in tables:
            known = previous.pop(id(table), None)
            if known is None:
                continue
            row, length, _ = known
            if len(table) < length:  # not grown at its end after all: convert it again
                self.array[row, :length] = 0
                continue
            if len(table) > length:
                self.array[row, length : len(table)] = table[length:]
            current[id(table)] = (row, len(table), table)
        for row, length, _ in previous.values():
            self.array[row, :length] = 0
        if len(current) < len(tables):
            taken = {row for row, _, _ in current.values()}
            free = (row for row in range(self.array.shape[0]) if row not in taken)
            for table in tables:
                if id(table) not in current:  # (a table passed twice in one step gets one row)
                    row = next(free)
                    self.array[row, : len(table)] = table
                    current[id(table)] = (row, len(table), table)
        self.rows = current
        out[:] = self.array[[current[id(table)][0] for table in tables], : out.shape[1]]
        return [len(table) for table in tables]

    def _reserve(self, num_rows: int, width: int) -> None:
        """Rows for num_rows tables, this wide (a row kept from the last step is one of them)."""
        have_rows, have_width = self.array.shape
        if num_rows > have_rows or width > have_width:
            grown = np.zeros((max(num_rows, 2 * have_rows), max(width, 2 * have_width)), dtype=np.int32)
            grown[:have_rows, :have_width] = self.array
            self.array = grown


LandedCopies = tuple[torch.Tensor, torch.Tensor | None, torch.cuda.Event | None]


class TokenLanding:
    """Pinned host buffers that sampled tokens are copied into without a wait, in turn: a buffer is written
    again only `depth` steps later, and a step is resolved at most one step after the next is launched."""

    def __init__(self, device: torch.device, depth: int = 3) -> None:
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * depth
        self.turn = 0

    def send(self, token_ids: torch.Tensor, logprobs: torch.Tensor | None) -> LandedCopies:
        if self.device.type != "cuda":
            return token_ids, logprobs, None
        self.turn = (self.turn + 1) % len(self.buffers)
        n, buffer = token_ids.shape[0], self.buffers[self.turn]
        if buffer is None or buffer.shape[1] < n:
            buffer = self.buffers[self.turn] = torch.empty(2, max(n, 64), dtype=torch.int64, pin_memory=True)
        host_ids = buffer[0, :n]
        host_ids.copy_(token_ids, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = buffer[1].view(torch.float32)[:n]
            host_logprobs.copy_(logprobs, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return host_ids, host_logprobs, landed
