"""The Ray controller: starts or joins Ray, places the prefill and decode pools with placement groups,
opens a KV channel between a prefill and a decode worker on first use, and watches worker health."""

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

from diptych.cluster.config import DeploymentConfig
from diptych.decode.worker import DecodeWorker
from diptych.engine.kv_transfer import ChannelSpec
from diptych.engine.llm_engine import EngineConfig
from diptych.engine.messages import LoadReport, TransferSettings, WorkerSpec
from diptych.prefill.worker import PrefillWorker

log = logging.getLogger(__name__)

# A CPU-only worker asks Ray for a sliver of a CPU so that several fit on a small machine; its torch
# threads are set separately (WorkerSpec.torch_threads).
CPU_WORKER_SHARE = 0.01


@dataclass
class Pool:
    role: str
    group: PlacementGroup
    actors: dict[str, Any] = field(default_factory=dict)  # worker id -> actor handle
    dead: set[str] = field(default_factory=set)

    def live(self) -> dict[str, Any]:
        return {wid: h for wid, h in self.actors.items() if wid not in self.dead}


class Controller:
    def __init__(self, config: DeploymentConfig) -> None:
        self.config = config
        self.pools: dict[str, Pool] = {}
        self.loads: dict[str, LoadReport] = {}
        self._channels: dict[tuple[str, str], asyncio.Task[ChannelSpec]] = {}
        self._started_ray = False
        self._watch: asyncio.Task[None] | None = None

    # ---- lifecycle (blocking; run before the gateway's event loop serves) ----

    def start(self) -> None:
        self._init_ray()
        cfg = self.config
        transfer = TransferSettings(
            cfg.resolved_transport,
            cfg.kv_transport.layers_per_message,
            cfg.kv_transport.timeout_s,
            cfg.kv_transport.stream_layers,
            cfg.kv_transport.lanes,
        )
        self.pools["prefill"] = self._place(
            "prefill",
            PrefillWorker,
            cfg.prefill.workers,
            cfg.prefill.gpus_per_worker,
            self._engine_config("prefill"),
            transfer,
        )
        self.pools["decode"] = self._place(
            "decode",
            DecodeWorker,
            cfg.decode.workers,
            cfg.decode.gpus_per_worker,
            self._engine_config("decode"),
            transfer,
        )
        handles = [h for pool in self.pools.values() for h in pool.actors.values()]
        ray.get([h.healthy.remote() for h in handles])  # every engine has loaded
        for pool in self.pools.values():
            for wid, report in zip(pool.actors, ray.get([h.load.remote() for h in pool.actors.values()])):
                self.loads[wid] = report

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for pool in self.pools.values():
            for handle in pool.actors.values():
                ray.kill(handle, no_restart=True)
            remove_placement_group(pool.group)
        self.pools.clear()
        if self._started_ray:
            ray.shutdown()

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        rc = self.config.ray
        if rc.address is None:
            temp_dir = rc.temp_dir or os.path.join(tempfile.gettempdir(), "diptych-ray")
            os.makedirs(temp_dir, exist_ok=True)
            ray.init(
                num_cpus=rc.num_cpus,
                _temp_dir=temp_dir,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
        else:
            ray.init(address=rc.address)
        self._started_ray = True

    def _engine_config(self, role: str) -> EngineConfig:
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

    def _place(
        self, role: str, cls: type, workers: int, gpus: int, engine: EngineConfig, transfer: TransferSettings
    ) -> Pool:
        bundle: dict[str, float] = {"CPU": 1.0, "GPU": float(gpus)} if gpus else {"CPU": CPU_WORKER_SHARE}
        group = placement_group([bundle] * workers, strategy="PACK", name=f"diptych-{role}")
        ray.get(group.ready())
        pool = Pool(role, group)
        threads = max(1, (os.cpu_count() or 2) // (self.config.prefill.workers + self.config.decode.workers))
        actor_cls: Any = ray.remote(cls)
        for i in range(workers):
            wid = f"{role}-{i}"
            spec = WorkerSpec(wid, role, engine, transfer, torch_threads=threads)
            pool.actors[wid] = actor_cls.options(
                name=f"diptych-{wid}",
                num_cpus=bundle["CPU"],
                num_gpus=gpus,
                max_concurrency=1000,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(spec)
        return pool

    # ---- serving (asyncio) ----

    def prefill(self, worker_id: str) -> Any:
        return self.pools["prefill"].actors[worker_id]

    def decode(self, worker_id: str) -> Any:
        return self.pools["decode"].actors[worker_id]

    def live_loads(self, role: str) -> list[LoadReport]:
        return [self.loads[wid] for wid in self.pools[role].live() if wid in self.loads]

    def mark_dead(self, worker_id: str) -> None:
        for pool in self.pools.values():
            if worker_id in pool.actors and worker_id not in pool.dead:
                log.error("worker %s is dead: no new requests go to it", worker_id)
                pool.dead.add(worker_id)
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
        spec: ChannelSpec = await self.decode(decode_id).open_receiver.remote(prefill_id)
        await self.prefill(prefill_id).open_sender.remote(decode_id, spec)
        return spec

    def channel(self, prefill_id: str, decode_id: str) -> ChannelSpec | None:
        """The pair's open channel; None while none is (never opened, still opening, failed or forgotten)."""
        task = self._channels.get((prefill_id, decode_id))
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def forget_channel(self, prefill_id: str, decode_id: str) -> None:
        """The pair's channel broke: the next request on the pair opens a new one."""
        self._channels.pop((prefill_id, decode_id), None)

    def start_watching(self, period_s: float = 0.5) -> None:
        self._watch = asyncio.ensure_future(self._watch_loop(period_s))

    async def _watch_loop(self, period_s: float) -> None:
        while True:
            await self.refresh_loads()
            await asyncio.sleep(period_s)

    async def refresh_loads(self, timeout_s: float = 5.0) -> None:
        """Fresh load reports from every live worker; a worker that fails to answer is marked dead."""
        for pool in self.pools.values():
            for wid, handle in pool.live().items():
                try:
                    report = await asyncio.wait_for(handle.load.remote(), timeout_s)
                    if wid not in pool.dead:  # marked dead by a request while the report was on its way
                        self.loads[wid] = report
                    if not await asyncio.wait_for(handle.healthy.remote(), timeout_s):
                        self.mark_dead(wid)
                except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                    self.mark_dead(wid)
