"""The worker's Prometheus endpoint: the metrics of tasks/metrics.py, plus gauges read from
Redis at scrape time (queue depth, fleet-wide in-flight calls, dead letters)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import redis
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from config.settings import Settings
from tasks.state import redis_client

logger = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's higher priorities in lists named queue + SEP + step.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


class RedisStateCollector(Collector):
    """Gauges that live in Redis, so they describe the whole fleet, read when scraped."""

    def __init__(self, settings: Settings, queues: Iterable[str]) -> None:
        self.queues = sorted(set(queues))
        self.broker = redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=2
        )
        self.state = redis_client(settings)
        self.prefix = settings.key_prefix

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "enhance_queue_depth", "Jobs waiting in each broker queue.", labels=["queue"]
        )
        in_flight = GaugeMetricFamily(
            "enhance_fleet_in_flight_calls", "Calls to Runware open across the whole fleet."
        )
        dead = GaugeMetricFamily(
            "enhance_dead_letter_jobs", "Jobs in the dead-letter list (enhance-worker failed)."
        )
        waiting = GaugeMetricFamily(
            "enhance_account_waiting_calls",
            "Calls waiting for their fair share, by account and priority.",
            labels=["account", "priority"],
        )
        try:
            pipe = self.broker.pipeline(transaction=False)
            for queue in self.queues:
                pipe.llen(queue)
                for step in PRIORITY_STEPS:
                    pipe.llen(f"{queue}{PRIORITY_SEPARATOR}{step}")
            lengths = pipe.execute()
            per_queue = len(PRIORITY_STEPS) + 1
            for index, queue in enumerate(self.queues):
                depth.add_metric([queue], sum(lengths[index * per_queue : (index + 1) * per_queue]))
            state = self.state.pipeline(transaction=False)
            state.zcard(f"{self.prefix}:limit:global:leases")
            state.llen(f"{self.prefix}:dead")
            leases, dead_count = state.execute()
            in_flight.add_metric([], leases)
            dead.add_metric([], dead_count)
            for cls, priority in (("i", "interactive"), ("b", "batch")):
                base = f"{self.prefix}:limit:global"
                for raw in self.state.smembers(f"{base}:active:{cls}"):
                    account = raw.decode() if isinstance(raw, bytes) else str(raw)
                    depth_now = self.state.llen(f"{base}:q:{cls}:{account}")
                    waiting.add_metric([account, priority], depth_now)
        except redis.RedisError as exc:
            logger.warning("Could not read queue and fleet gauges from Redis: %s", exc)
            return
        yield depth
        yield in_flight
        yield dead
        yield waiting


def serve(settings: Settings, queues: Iterable[str]) -> None:
    """Serve /metrics on METRICS_PORT (all interfaces), if it is set."""
    if settings.metrics_port is None:
        return
    registry: CollectorRegistry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # prefork: add every child's values
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(RedisStateCollector(settings, queues))
    start_http_server(settings.metrics_port, registry=registry)
    logger.info("Prometheus metrics are served on port %s at /metrics.", settings.metrics_port)
