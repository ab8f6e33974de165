"""Runs an engine's step loop in its own thread; other threads hand it work as commands.

The engine (scheduler, block manager, model) is touched only from this thread, so it needs no locks.
Results go back to asyncio code through `deliver`, which is safe to call from the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from diptych.engine.messages import TokenDelta

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, name: str, step: Callable[[], bool], idle_wait_s: float = 0.02) -> None:
        """step() runs one engine iteration and returns whether there was work (else the thread idles)."""
        self._step = step
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle_wait_s = idle_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake it
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, command: Callable[[], None]) -> None:
        """Run command in the engine thread before its next step."""
        self._commands.put(command)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        busy = False
        try:
            while not self._stop.is_set():
                self._drain(block=not busy)
                busy = self._step()
        except BaseException as e:  # the worker reports itself unhealthy; the controller replaces it
            log.exception("engine thread %s died", self._thread.name)
            self.error = e


def deliver(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Call fn(*args) on an asyncio loop from another thread (a no-op once the loop is closed)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(fn, *args)


async def drain_until_finished(
    queue: asyncio.Queue[TokenDelta], on_abandon: Callable[[], None]
) -> AsyncIterator[TokenDelta]:
    """Yield a request's deltas until one carries a finish reason; if the consumer stops first (client
    gone, stop string), on_abandon runs so the request's blocks are freed."""
    finished = False
    try:
        while not finished:
            delta = await queue.get()
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            on_abandon()
