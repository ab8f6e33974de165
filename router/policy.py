"""Where a request runs: a routing policy picks one prefill and one decode worker from their load reports.

The controller asks the policy on every request; the SLO-aware router will be another entry in the
registry. Policies are pure functions of the reports, so they are tested without any worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the deployment config reads POLICIES without the engine's imports
    from diptych.engine.messages import GenerateRequest, LoadReport


class NoWorkerError(RuntimeError):
    """A pool has no worker to route to."""


class RoutingPolicy(ABC):
    @abstractmethod
    def choose(
        self, prefill: Sequence[LoadReport], decode: Sequence[LoadReport], request: GenerateRequest
    ) -> tuple[str, str]:
        """The (prefill worker id, decode worker id) to run `request` on; NoWorkerError if a pool is empty."""


class LeastLoaded(RoutingPolicy):
    """Fewest running plus waiting requests, then most free KV blocks, then the smallest worker id."""

    def choose(
        self, prefill: Sequence[LoadReport], decode: Sequence[LoadReport], request: GenerateRequest
    ) -> tuple[str, str]:
        return _least_loaded(prefill, "prefill"), _least_loaded(decode, "decode")


def _least_loaded(reports: Sequence[LoadReport], pool: str) -> str:
    if not reports:
        raise NoWorkerError(f"no {pool} worker is available")
    best = min(reports, key=lambda r: (r.running + r.waiting, r.used_blocks - r.total_blocks, r.worker_id))
    return best.worker_id


DEFAULT_POLICY = "least_loaded"
# The one list of policy names: the deployment config accepts exactly these keys.
POLICIES: dict[str, Callable[[], RoutingPolicy]] = {DEFAULT_POLICY: LeastLoaded}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
