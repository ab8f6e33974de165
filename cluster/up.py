"""`diptych up`: start (or join) Ray, start the deployment's controller actor (which places the pools), serve
the gateway until Ctrl-C or SIGTERM. `diptych gateway`: one more gateway process for a running deployment."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable

import ray
import uvicorn

from diptych.cluster.clients import ControllerClient
from diptych.cluster.config import DeploymentConfig, load_config, with_overrides
from diptych.cluster.controller import Deployment, init_ray
from diptych.cluster.disagg_backend import DisaggregatedBackend
from diptych.engine.config import RANDOM_PREFIX
from diptych.engine.loader import load_model_config, resolve_model
from diptych.engine.tokenizer import Tokenizer, load_tokenizer
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
    gateway = sub.add_parser(
        "gateway",
        help="serve one more gateway process for a deployment `diptych up` started on a Ray cluster",
    )
    gateway.add_argument(
        "--config", default=None, help="the deployment's YAML (its model and gateway settings)"
    )
    gateway.add_argument("--host", default=None, help="gateway host (overrides the config)")
    gateway.add_argument(
        "--port", type=int, default=None, help="gateway port (overrides the config; 0 = any free)"
    )
    gateway.add_argument(
        "--address", required=True, help="the deployment's Ray cluster (GCS address or 'auto')"
    )


def cmd_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = with_overrides(load_config(args.config), host=args.host, port=args.port, address=args.address)
    asyncio.run(serve(config, on_ready=_announce))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = with_overrides(load_config(args.config), host=args.host, port=args.port, address=args.address)
    asyncio.run(join(config, on_ready=_announce))
    return 0


def _announce(url: str, _: uvicorn.Server) -> None:
    print(f"diptych gateway listening on {url}", flush=True)


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
    tokenizer, max_len = _model_facts(config)  # fail on a bad model before placing anything
    deployment = Deployment(config)
    try:
        controller = await deployment.start()
        await serve_gateway(config, controller, tokenizer, max_len, on_ready)
    finally:
        await deployment.stop()


async def serve_gateway(
    config: DeploymentConfig,
    controller: ControllerClient,
    tokenizer: Tokenizer,
    max_len: int,
    on_ready: Callable[[str, uvicorn.Server], None] | None = None,
) -> None:
    """Serve one gateway process over a running deployment's controller until the server stops."""
    backend = DisaggregatedBackend(
        controller, make_policy(config.routing.policy), config.model.served_name, max_len
    )
    await backend.start()
    try:
        app = build_app(backend, tokenizer, gateway_settings(config))
        g = config.gateway
        server = GatewayServer(app, g.host, g.port, config.ray.shutdown_grace_s)
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            on_ready(server.url, server)
        await task
    finally:
        await backend.close()


async def join(
    config: DeploymentConfig, on_ready: Callable[[str, uvicorn.Server], None] | None = None
) -> None:
    """`diptych gateway`: one more gateway process for a deployment that `diptych up` started."""
    tokenizer, max_len = _model_facts(config)
    started_ray = init_ray(
        config.ray
    )  # on this thread: Ray's processes die with the thread that started them
    try:
        controller = await ControllerClient.find()
        await serve_gateway(config, controller, tokenizer, max_len, on_ready)
    finally:
        if started_ray:
            ray.shutdown()


def _model_facts(config: DeploymentConfig) -> tuple[Tokenizer, int]:
    if config.model.path and config.model.path.startswith(RANDOM_PREFIX):
        raise ValueError("the gateway needs a tokenizer: random-weight models are for benchmarks only")
    source = resolve_model(config.model.path)
    model_len = load_model_config(source).max_position_embeddings
    return load_tokenizer(source), min(config.model.max_model_len or model_len, model_len)
