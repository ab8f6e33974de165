"""The controller: one named Ray actor per deployment that owns placement, KV channels, loads and health.

It places the prefill and decode pools with placement groups, opens a KV channel between a prefill and a
decode worker on first use, polls every worker's load and health, and marks dead workers. Gateways (one
or several processes) hold a handle to it (cluster/clients.py: ControllerClient) and read its view;
`Deployment` is what the driver uses to start and stop it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from diptych.cluster.clients import (
    CONTROLLER_NAME,
    NAMESPACE,
    ControllerClient,
    DecodeClient,
    PrefillClient,
    WorkerDied,
    actor_name,
)
from diptych.cluster.config import DeploymentConfig, RaySection
from diptych.decode.worker import DecodeWorker
from diptych.engine.engine_config import EngineConfig
from diptych.engine.messages import (
    ChannelSpec,
    DeploymentView,
    LoadReport,
    Role,
    TransferSettings,
    WorkerRef,
    WorkerSpec,
)
from diptych.prefill.worker import PrefillWorker

log = logging.getLogger(__name__)

# A CPU-only worker asks Ray for a sliver of a CPU so that several fit on a small machine; its torch
# threads are set separately (WorkerSpec.torch_threads).
CPU_WORKER_SHARE = 0.01
WATCH_PERIOD_S = 0.5
PROBE_TIMEOUT_S = 5.0


@dataclass
class Pool:
    role: Role
    group: PlacementGroup
    workers: dict[str, PrefillClient | DecodeClient] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)

    def live(self) -> dict[str, PrefillClient | DecodeClient]:
        return {wid: w for wid, w in self.workers.items() if wid not in self.dead}


class Controller:
    """The actor's body (created by `Deployment.start` as the named actor CONTROLLER_NAME)."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.pools: dict[Role, Pool] = {}
        self.loads: dict[str, LoadReport] = {}
        self._channels: dict[tuple[str, str], asyncio.Task[ChannelSpec]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._version = 0

    # ---- lifecycle ----

    async def start(self) -> None:
        """Place both pools and wait until every engine has loaded; then watch their health."""
        cfg = self.config
        transport = cfg.kv_transport
        transfer = TransferSettings(
            cfg.resolved_transport,
            transport.layers_per_message,
            transport.timeout_s,
            transport.stream_layers,
            transport.lanes,
        )
        self.pools["prefill"] = await self._place("prefill", PrefillWorker, cfg.prefill.workers,
                                                  cfg.prefill.gpus_per_worker, transfer)  # fmt: skip
        self.pools["decode"] = await self._place("decode", DecodeWorker, cfg.decode.workers,
                                                 cfg.decode.gpus_per_worker, transfer)  # fmt: skip
        workers = [w for pool in self.pools.values() for w in pool.workers.values()]
        await asyncio.gather(*(w.healthy() for w in workers))  # every engine has loaded
        for w, report in zip(workers, await asyncio.gather(*(w.load() for w in workers))):
            self.loads[w.worker_id] = report
        self._watch = asyncio.ensure_future(self._watch_loop())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for pool in self.pools.values():
            for w in pool.workers.values():
                ray.kill(w.handle, no_restart=True)
            remove_placement_group(pool.group)
        self.pools.clear()

    def _engine_config(self, role: Role) -> EngineConfig:
        cfg = self.config
        pool = cfg.prefill if role == "prefill" else cfg.decode
        on_gpu = pool.gpus_per_worker > 0
        return EngineConfig(
            model=cfg.model.path,
            dtype=cfg.resolved_dtype,
            device="cuda" if on_gpu else "cpu",
            block_size=cfg.decode.block_size,
            kv_cache_gib=pool.kv_cache_gib,
            gpu_memory_fraction=pool.gpu_memory_fraction,
            max_num_seqs=cfg.prefill.max_num_seqs if role == "prefill" else cfg.decode.max_batch,
            max_num_batched_tokens=cfg.prefill.token_budget
            if role == "prefill"
            else max(cfg.decode.max_batch, 512),
            chunk_size=cfg.prefill.chunk_size if role == "prefill" else None,
            cuda_graphs=role == "decode",  # prefill workers never run decode steps
            # (and never run ahead: each step's KV goes out through its plan)
            async_scheduling=role == "decode" and on_gpu and cfg.decode.async_scheduling,
            max_model_len=cfg.model.max_model_len,
            cpu_quantized_weights=cfg.model.cpu_quantized_weights,
            load_progress=False,
        )

    async def _place(
        self, role: Role, cls: type, workers: int, gpus: int, transfer: TransferSettings
    ) -> Pool:
        bundle: dict[str, float] = {"CPU": 1.0, "GPU": float(gpus)} if gpus else {"CPU": CPU_WORKER_SHARE}
        group = placement_group([bundle] * workers, strategy="PACK", name=f"diptych-{role}")
        await group.ready()
        pool = Pool(role, group)
        threads = max(1, (os.cpu_count() or 2) // (self.config.prefill.workers + self.config.decode.workers))
        actor_cls: Any = ray.remote(cls)
        client = PrefillClient if role == "prefill" else DecodeClient
        engine = self._engine_config(role)
        for i in range(workers):
            wid = f"{role}-{i}"
            spec = WorkerSpec(wid, role, engine, transfer, torch_threads=threads)
            handle = actor_cls.options(
                name=actor_name(wid),
                namespace=NAMESPACE,
                num_cpus=bundle["CPU"],
                num_gpus=gpus,
                max_concurrency=1000,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(spec)
            pool.workers[wid] = client(wid, handle)
        return pool

    # ---- what gateways ask ----

    def workers(self) -> list[WorkerRef]:
        return [
            WorkerRef(wid, pool.role, w.handle)
            for pool in self.pools.values()
            for wid, w in pool.workers.items()
        ]

    def view(self) -> DeploymentView:
        live = [wid for pool in self.pools.values() for wid in pool.live()]
        dead = [wid for pool in self.pools.values() for wid in pool.dead]
        return DeploymentView(
            tuple(self.loads[w] for w in live if w in self.loads), tuple(dead), self._version
        )

    def mark_dead(self, worker_id: str) -> None:
        for pool in self.pools.values():
            if worker_id in pool.workers and worker_id not in pool.dead:
                log.error("worker %s is dead: no new requests go to it", worker_id)
                pool.dead.add(worker_id)
                self._version += 1
        self.loads.pop(worker_id, None)  # its last report would stay in /metrics and the routing forever
        for pair in [p for p in self._channels if worker_id in p]:
            del self._channels[pair]

    async def ensure_channel(self, prefill_id: str, decode_id: str) -> None:
        """Open the KV channel of a pair once; concurrent callers wait for the same opening."""
        pair = (prefill_id, decode_id)
        task = self._channels.get(pair)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(self._open_channel(prefill_id, decode_id))
            self._channels[pair] = task
        await asyncio.shield(task)

    async def _open_channel(self, prefill_id: str, decode_id: str) -> ChannelSpec:
        prefill = self.pools["prefill"].workers[prefill_id]
        decode = self.pools["decode"].workers[decode_id]
        assert isinstance(prefill, PrefillClient) and isinstance(decode, DecodeClient)
        spec = await decode.open_receiver(prefill)
        await prefill.open_sender(decode_id, spec)
        return spec

    def channel(self, prefill_id: str, decode_id: str) -> ChannelSpec | None:
        """The pair's open channel; None while none is (never opened, still opening, failed or forgotten)."""
        task = self._channels.get((prefill_id, decode_id))
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def forget_channel(self, prefill_id: str, decode_id: str) -> None:
        """The pair's channel broke: the next request on the pair opens a new one."""
        if self._channels.pop((prefill_id, decode_id), None) is not None:
            self._version += 1

    async def _watch_loop(self) -> None:
        while True:
            await self.refresh_loads()
            await asyncio.sleep(WATCH_PERIOD_S)

    async def refresh_loads(self) -> None:
        """Fresh load reports from every live worker; a worker that fails to answer is marked dead."""
        for pool in self.pools.values():
            for wid, worker in pool.live().items():
                try:
                    report = await asyncio.wait_for(worker.load(), PROBE_TIMEOUT_S)
                    if wid not in pool.dead:  # marked dead by a request while the report was on its way
                        self.loads[wid] = report
                    if not await asyncio.wait_for(worker.healthy(), PROBE_TIMEOUT_S):
                        self.mark_dead(wid)
                except (WorkerDied, asyncio.TimeoutError):
                    self.mark_dead(wid)


def init_ray(rc: RaySection) -> bool:
    """Start a local Ray cluster, or join rc.address; False when this process was already attached."""
    if ray.is_initialized():
        return False
    if rc.address is None:
        temp_dir = rc.temp_dir or os.path.join(tempfile.gettempdir(), "diptych-ray")
        os.makedirs(temp_dir, exist_ok=True)
        ray.init(
            num_cpus=rc.num_cpus,
            namespace=NAMESPACE,
            _temp_dir=temp_dir,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        ray.init(address=rc.address, namespace=NAMESPACE)
    return True


class Deployment:
    """The driver's handle on a deployment: Ray, the controller actor and through it the pools."""

    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self._started_ray = False
        self._actor: Any = None
        self.controller: ControllerClient | None = None

    async def start(self) -> ControllerClient:
        # On this thread, not a worker thread: Ray's processes die with the thread that started them.
        self._started_ray = init_ray(self.config.ray)
        actor_cls: Any = ray.remote(Controller)
        self._actor = actor_cls.options(
            name=CONTROLLER_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=1000
        ).remote(self.config)
        await self._actor.start.remote()
        self.controller = await ControllerClient.connect(self._actor)
        return self.controller

    async def stop(self) -> None:
        if self._actor is not None:
            try:
                await self._actor.stop.remote()
            finally:
                ray.kill(self._actor, no_restart=True)
                self._actor = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
