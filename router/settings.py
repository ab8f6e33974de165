"""The gateway's settings: one frozen dataclass, checked on construction.

Its defaults are the deployment's too: cluster.config's gateway section takes them from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewaySettings:
    served_model_names: tuple[str, ...] = ()  # empty: the backend's model_name
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_pending: int = 256  # requests in flight before new ones get 429
    request_timeout_s: float = 600.0  # whole request, first byte to last token
    retry_after_s: int = 1  # sent with 429 and 503
    disconnect_poll_s: float = 0.05  # how often a waiting request checks that its client is still there

    def __post_init__(self) -> None:
        if any(not name for name in self.served_model_names):
            raise ValueError("served_model_names must not contain empty names")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys must not contain empty keys")
        for name in ("max_body_bytes", "max_pending", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "disconnect_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def model_names(self, backend_model_name: str) -> tuple[str, ...]:
        return self.served_model_names or (backend_model_name,)
