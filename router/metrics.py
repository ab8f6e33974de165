"""Prometheus metrics of one gateway app, in its own registry (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from diptych.engine.messages import LoadReport
from diptych.router.backend import Phase

# Latency buckets in seconds: from a fast decode step to a long generation.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class GatewayMetrics:
    def __init__(self, load: Callable[[], list[LoadReport]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diptych_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "diptych_time_to_first_token_seconds", "Arrival to first token", buckets=_SLOW, registry=r
        )
        self.tpot = Histogram(
            "diptych_time_per_output_token_seconds", "Gap between output tokens", buckets=_FAST, registry=r
        )
        self.e2e = Histogram(
            "diptych_e2e_request_latency_seconds", "Arrival to last token", buckets=_SLOW, registry=r
        )
        self.queue = Histogram(
            "diptych_queue_time_seconds", "Time waiting in a worker queue", buckets=_SLOW, registry=r
        )
        self.kv_transfer = Histogram(
            "diptych_kv_transfer_seconds", "Prefill-to-decode KV handoff", buckets=_FAST, registry=r
        )
        self.prompt_tokens = Counter("diptych_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("diptych_generation_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("diptych_gateway_requests_in_flight", "Requests the gateway holds", registry=r)
        r.register(_WorkerLoadCollector(load))

    def observe_phase(self, phase: Phase, seconds: float) -> None:
        {Phase.QUEUE: self.queue, Phase.KV_TRANSFER: self.kv_transfer}[phase].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerLoadCollector(Collector):
    """Reads the backend's load reports at scrape time, so the gauges are never stale."""

    def __init__(self, load: Callable[[], list[LoadReport]]) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        running = GaugeMetricFamily("diptych_worker_running_requests", "Requests running", labels=labels)
        waiting = GaugeMetricFamily("diptych_worker_waiting_requests", "Requests waiting", labels=labels)
        used = GaugeMetricFamily("diptych_worker_kv_blocks_used", "KV cache blocks in use", labels=labels)
        total = GaugeMetricFamily("diptych_worker_kv_blocks_total", "KV cache blocks", labels=labels)
        held = GaugeMetricFamily(
            "diptych_worker_held_requests", "Prefilled requests held until decode has the KV", labels=labels
        )
        served = CounterMetricFamily("diptych_worker_served_requests", "Requests handed on", labels=labels)
        transfer = GaugeMetricFamily(
            "diptych_worker_kv_transfer_mean_seconds", "Reservation to KV landed, recent mean", labels=labels
        )
        for report in self._load():
            key = [report.worker_id, report.role]
            running.add_metric(key, report.running)
            waiting.add_metric(key, report.waiting)
            used.add_metric(key, report.used_blocks)
            total.add_metric(key, report.total_blocks)
            held.add_metric(key, report.held)
            served.add_metric(key, report.served)
            transfer.add_metric(key, report.kv_transfer_s_mean)
        yield from (running, waiting, used, total, held, served, transfer)
