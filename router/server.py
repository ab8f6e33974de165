"""The gateway's HTTP server: uvicorn, with its protocol-level errors in the OpenAI shape, and a shutdown
that gives in-flight requests a grace period, then ends each one still running with an error."""

from __future__ import annotations

import asyncio
import json
import math
import socket

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from diptych.router.errors import bad_request

# After the grace period, the error events of the requests it ends need a moment to reach their clients
# before uvicorn cancels what is left.
FLUSH_S = 2.0


class OpenAIErrorsH11(H11Protocol):
    """h11 as uvicorn runs it, but a request that fails to parse (a bad Content-Length, a broken header)
    gets its 400 in the OpenAI error shape like every other error."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(bad_request(f"malformed HTTP request: {msg}").body()).encode()
        head = (
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


class GatewayServer(uvicorn.Server):
    """uvicorn serving a gateway app (router.app.build_app) on host:port; on exit (SIGTERM, Ctrl-C or
    should_exit) it stops accepting, waits up to grace_s for in-flight requests, then ends the rest with
    a 503 (streams: an error event, then [DONE])."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_s: float, log_level: str = "info") -> None:
        self.grace_s = grace_s
        self.closing: asyncio.Event = app.state.gateway.closing
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=OpenAIErrorsH11,
            log_level=log_level,
            timeout_graceful_shutdown=math.ceil(grace_s + FLUSH_S),
        )
        super().__init__(config)

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ender = asyncio.ensure_future(self._close_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()

    async def _close_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        self.closing.set()
