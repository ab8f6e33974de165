"""A whole deployment (local Ray cluster, workers, HTTP gateway) for a test module, and the polling helper."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from diptych.cluster.config import parse_config
from diptych.cluster.up import serve


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def running_deployment(config: dict[str, Any]) -> Iterator[str]:
    """`diptych up` of config on a background thread; yields the gateway's URL, stops it on exit."""
    ready: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(serve(parse_config(config), on_ready=lambda url, s: ready.update(url=url, server=s)))
        except BaseException as e:  # surfaced below, on the test's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: "url" in ready or bool(errors), 240, "the deployment to start")
    if errors:
        raise errors[0]
    try:
        yield ready["url"]
    finally:
        ready["server"].should_exit = True
        thread.join(60)
