"""`diptych up`: start (or join) Ray, place the pools, serve the gateway until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

import uvicorn

from diptych.cluster.config import DeploymentConfig, load_config, with_overrides
from diptych.cluster.controller import Controller
from diptych.cluster.disagg_backend import DisaggregatedBackend
from diptych.engine.loader import load_model_config, resolve_model
from diptych.engine.tokenizer import load_tokenizer
from diptych.router.app import build_app
from diptych.router.policy import make_policy
from diptych.router.server import GatewayServer
from diptych.router.settings import GatewaySettings

log = logging.getLogger("diptych")


def add_up_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="start the prefill/decode pools on Ray and the OpenAI-compatible gateway")
    up.add_argument(
        "--config", default=None, help="deployment YAML (default: embedded model, 1P + 1D on CPU)"
    )
    up.add_argument("--host", default=None, help="gateway host (overrides the config)")
    up.add_argument(
        "--port", type=int, default=None, help="gateway port (overrides the config; 0 = any free)"
    )
    up.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")


def cmd_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = with_overrides(load_config(args.config), host=args.host, port=args.port, address=args.address)
    asyncio.run(
        serve(config, on_ready=lambda url, _: print(f"diptych gateway listening on {url}", flush=True))
    )
    return 0


def gateway_settings(config: DeploymentConfig) -> GatewaySettings:
    g = config.gateway
    return GatewaySettings(
        served_model_names=(config.model.served_name,),
        api_keys=g.api_keys,
        max_body_bytes=g.max_body_bytes,
        max_pending=g.max_pending,
        request_timeout_s=g.request_timeout_s,
    )


async def serve(
    config: DeploymentConfig, on_ready: Callable[[str, uvicorn.Server], None] | None = None
) -> None:
    """Run the whole deployment until the server stops (a signal, or server.should_exit); always tears
    the pools down. on_ready gets the gateway's URL and the server once it listens."""
    if config.model.path and config.model.path.startswith("random:"):
        raise ValueError("the gateway needs a tokenizer: random-weight models are for benchmarks only")
    source = resolve_model(config.model.path)
    tokenizer = load_tokenizer(source)
    model_len = load_model_config(source).max_position_embeddings
    max_len = min(config.model.max_model_len or model_len, model_len)
    controller = Controller(config)
    await asyncio.to_thread(controller.start)
    try:
        backend = DisaggregatedBackend(
            controller, make_policy(config.routing.policy), config.model.served_name, max_len
        )
        app = build_app(backend, tokenizer, gateway_settings(config))
        g = config.gateway
        server = GatewayServer(app, g.host, g.port, config.ray.shutdown_grace_s)
        controller.start_watching()
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            on_ready(server.url, server)
        await task
    finally:
        await asyncio.to_thread(controller.stop)
