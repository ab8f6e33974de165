"""A one-entry memo for what a CPU reference derives from per-step metadata (gather indices, masks, tables).

Every layer of a forward pass hands a kernel the same small metadata tensors (positions, KV lengths, block
tables, slot mapping), so what the reference derives from them is the same for all of a model's layers. On
CPU each torch op costs about as much as its arithmetic at decode sizes, so deriving it once a step instead
of once a layer matters. The memo keeps the last result with a copy of the tensors it came from and hands it
back while they are equal in value: one comparison op instead of several, and still right when a caller
refills a tensor in place. Large inputs that are built once and never written (the RoPE table) are compared
by identity instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class StepMemo(Generic[T]):
    def __init__(self) -> None:
        # (copies of the compared tensors, the identity-compared objects, the scalars, the result)
        self._entry: tuple[tuple[torch.Tensor, ...], tuple[object, ...], tuple[object, ...], T] | None = None

    def get(
        self,
        build: Callable[[], T],
        equal: tuple[torch.Tensor, ...],
        identical: tuple[object, ...] = (),
        scalars: tuple[object, ...] = (),
    ) -> T:
        """build(), unless the last call had tensors equal to `equal`, the same `identical` objects and
        equal `scalars`: then the last result."""
        entry = self._entry
        if entry is not None and _matches(entry, equal, identical, scalars):
            return entry[3]
        value = build()
        # The reference to `identical` keeps those objects alive, so no new object can reuse their identity.
        self._entry = (tuple(t.clone() for t in equal), identical, scalars, value)
        return value


def _matches(
    entry: tuple[tuple[torch.Tensor, ...], tuple[object, ...], tuple[object, ...], object],
    equal: tuple[torch.Tensor, ...],
    identical: tuple[object, ...],
    scalars: tuple[object, ...],
) -> bool:
    # Plain loops: this runs for every layer, and generator expressions cost more than the comparisons.
    old_equal, old_identical, old_scalars, _ = entry
    if old_scalars != scalars or len(old_identical) != len(identical) or len(old_equal) != len(equal):
        return False
    for old, new in zip(old_identical, identical):
        if old is not new:
            return False
    for old, new in zip(old_equal, equal):
        if old.dtype != new.dtype or old.device != new.device or not torch.equal(old, new):
            return False
    return True
