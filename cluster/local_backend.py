"""The single-process engine behind the gateway's backend interface (colocated mode and test reference)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from diptych.engine.engine_thread import EngineThread, deliver, drain_until_finished
from diptych.engine.llm_engine import LLMEngine, RequestError
from diptych.engine.messages import FinishReason, GenerateRequest, LoadReport, TokenDelta
from diptych.router.backend import BackendRejectedError, BackendUnavailableError, GenerationBackend, Phase


class LocalEngineBackend(GenerationBackend):
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        super().__init__()
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenDelta]]] = {}
        self._thread = EngineThread("local-engine", self._step)
        self._thread.start()

    def close(self) -> None:
        self._thread.stop()

    def _step(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        for delta in self.engine.step():
            self._push(delta)
        return True

    def _push(self, delta: TokenDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None:
            return
        if delta.finished:
            del self._streams[delta.request_id]
        deliver(stream[0], stream[1].put_nowait, delta)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if not self._thread.alive:
            raise BackendUnavailableError("the engine thread is not running")
        try:
            self.engine.check_request(request)  # bad requests fail here, before any token
        except RequestError as e:
            raise BackendRejectedError(str(e)) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        rid = request.request_id

        def admit() -> None:
            self._streams[rid] = (loop, queue)
            self.engine.add_request(request)

        self._thread.submit(admit)
        async for delta in drain_until_finished(queue, lambda: self._abort_soon(rid)):
            if delta.queue_s is not None:
                self.report_timing(Phase.QUEUE, delta.queue_s)
            yield delta

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        def drop() -> None:
            stream = self._streams.pop(request_id, None)
            if request_id in self.engine.sequences:
                self.engine.abort_request(request_id)
                if stream is not None:
                    deliver(
                        stream[0],
                        stream[1].put_nowait,
                        TokenDelta(request_id, (), finish_reason=FinishReason.ABORT),
                    )

        self._thread.submit(drop)

    def load(self) -> list[LoadReport]:
        s = self.engine.scheduler
        return [
            LoadReport(
                "engine-0",
                "colocated",
                len(s.running),
                len(s.waiting),
                self.engine.blocks.num_used_blocks,
                self.engine.blocks.num_blocks,
            )
        ]

    async def check_health(self) -> bool:
        return self._thread.alive
