"""The worker's Prometheus endpoint: the metrics of tasks/metrics.py, plus gauges read from
Redis at scrape time (queue depth including the fair queues, waiting jobs and the oldest one's
age per account and priority, delayed jobs, fleet-wide in-flight calls, dead letters)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import redis
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from config.keys import FairKeys, StateKeys, celery_queue_keys
from config.settings import Settings
from tasks import scripts
from tasks.dispatcher import PRIORITY_NAMES
from tasks.limiter import broker_redis
from tasks.state import redis_client

logger = logging.getLogger(__name__)


class RedisStateCollector(Collector):
    """Gauges that live in Redis, so they describe the whole fleet, read when scraped (one
    script in the broker's Redis, one read of the state Redis)."""

    def __init__(self, settings: Settings, queues: Iterable[str]) -> None:
        self.queues = sorted(set(queues))
        self.keys = FairKeys(settings.key_prefix)
        self.broker = broker_redis(settings)
        self.state = redis_client(settings)
        self.dead_key = StateKeys(settings.key_prefix).dead_letters
        self._gauges = scripts.register(self.broker, "gauges")
        keys = self.keys
        self._script_keys = [
            keys.intake,
            keys.delayed,
            keys.ready,
            keys.leases,
            keys.active("i"),
            keys.queue_prefix("i"),
            keys.active("b"),
            keys.queue_prefix("b"),
            *celery_queue_keys(self.queues),
        ]

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "enhance_queue_depth",
            "Jobs waiting to run: in the broker queue, the fair queues and the ready queue.",
            labels=["queue"],
        )
        delayed = GaugeMetricFamily(
            "enhance_delayed_jobs",
            "Jobs waiting for their countdown (retries, polls, ETAs), kept in Redis.",
        )
        in_flight = GaugeMetricFamily(
            "enhance_fleet_in_flight_calls",
            "Jobs granted a slot and not finished, across the whole fleet.",
        )
        dead = GaugeMetricFamily(
            "enhance_dead_letter_jobs", "Jobs in the dead-letter list (enhance-worker failed)."
        )
        waiting = GaugeMetricFamily(
            "enhance_account_waiting_calls",
            "Jobs waiting for their fair share, by account and priority.",
            labels=["account", "priority"],
        )
        oldest = GaugeMetricFamily(
            "enhance_account_oldest_wait_seconds",
            "How long the oldest waiting job of each account and priority has waited.",
            labels=["account", "priority"],
        )
        try:
            reply = scripts.run(self._gauges, self._script_keys, [])
            dead_count = self.state.llen(self.dead_key)
        except redis.RedisError as exc:
            logger.warning("Could not read queue and fleet gauges from Redis: %s", exc)
            return
        incoming, delayed_count, ready, leases = (int(v) for v in reply[:4])
        fair = 0
        for index in range(4, len(reply), 4):
            account, klass, count, age = reply[index : index + 4]
            labels = [account.decode(), PRIORITY_NAMES[klass.decode()]]
            waiting.add_metric(labels, int(count))
            oldest.add_metric(labels, float(age))
            fair += int(count)
        # One queue in practice (`celery`); the fair and ready jobs are counted under the first.
        for position, queue in enumerate(self.queues):
            depth.add_metric([queue], (incoming + fair + ready) if position == 0 else 0)
        delayed.add_metric([], delayed_count)
        in_flight.add_metric([], leases)
        dead.add_metric([], dead_count)
        yield from (depth, delayed, in_flight, dead, waiting, oldest)


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
    server, _ = start_http_server(settings.metrics_port, registry=registry)
    # The port bound, which differs from METRICS_PORT=0's; tests read it from this line.
    logger.info("Prometheus metrics are served on port %d at /metrics.", server.server_port)
