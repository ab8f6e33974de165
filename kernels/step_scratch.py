"""What the CPU references derive from one step's metadata (gather plans, skip flags, RoPE rows), kept for
the step's other layers.

Every layer of a forward pass hands a kernel the same small metadata tensors (positions, KV lengths, block
tables, slot mapping), and on CPU each torch op costs about as much as its arithmetic at decode sizes, so
deriving them once a step instead of once a layer matters. A StepScratch is made with each step's
AttentionMetadata (engine/forward_context.py) and dies with it: no other step, engine or thread sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class StepScratch:
    """Values keyed by name, each built on its first use in the step. Pass one only along with the step's
    own metadata tensors: a key names what is derived, not the tensors it is derived from."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value stored under key, from build() on the step's first call."""
        values = self._values
        if key in values:
            return values[key]
        value = values[key] = build()
        return value

    def __len__(self) -> int:
        return len(self._values)


def derived(scratch: StepScratch | None, key: Hashable, build: Callable[[], T]) -> T:
    """build() through the step's scratch when there is one; without one, build() every call."""
    return build() if scratch is None else scratch.get(key, build)
