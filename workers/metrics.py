"""The worker's Prometheus endpoint: the metrics of tasks/metrics.py, plus gauges of the whole
fleet read from Redis at scrape time: the backlog (queue depth including the fair queues, jobs
waiting and the oldest one's age per account and priority, delayed jobs), the limits (in-flight
calls and their cap, the rate, the cool-down), the money (spent today, reserved, unsettled and
budget left, per account and for the fleet), the dead letters, and each Redis's memory against
its maxmemory.

Every worker reports the same fleet-wide values: aggregate them with `max`, never `sum`
(deploy/prometheus/ and deploy/grafana/ do). With METRICS_FLEET_GAUGES=dispatcher only the
process that holds the dispatcher role reports them, so a `sum` is right too. A scrape costs
one script in the broker's Redis and one in the state Redis (tasks/lua/gauges.lua,
tasks/lua/money_gauges.lua), plus one call per 250 waiting accounts (gauges_accounts.lua) and
one HSCAN per 500 accounts that spent today, and
scrapes within a second of each other share one reading.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from config.keys import PRIORITY_CLASSES, FairKeys, StateKeys, celery_queue_keys
from config.settings import Settings
from tasks import scripts
from tasks.dispatcher import PRIORITY_NAMES
from tasks.ledger import MICRO, utc_day
from tasks.limiter import broker_redis
from tasks.metrics import OTHER, RUNWARE_LATENCY
from tasks.state import redis_client, text

logger = logging.getLogger(__name__)

READING_TTL_S = 1.0  # scrapes closer together than this share one reading of Redis
ACCOUNTS_PER_CALL = 250  # waiting accounts read per script call (a few ms of Redis each)
DAY_FIELDS_PER_CALL = 1000  # fields of today's totals read per HSCAN (one per account: 2)
CALL_DURATION = next(iter(RUNWARE_LATENCY.describe())).name  # its family's name in /metrics


class RecentCalls:
    """The mean duration of this worker's Runware calls since the previous scrape, from the call
    histogram (`families`: this process's, or with prefork every child's, as /metrics serves
    them); the last value known while it makes none, and None before its first call."""

    def __init__(self, families: Callable[[], Iterable[Metric]] = RUNWARE_LATENCY.collect) -> None:
        self._families = families
        self._lock = threading.Lock()
        self._seen = (0.0, 0.0)  # the histogram's (sum, count) at the previous read
        self.seconds: float | None = None

    def read(self) -> float | None:
        total = count = 0.0
        for family in self._families():
            if family.name != CALL_DURATION:
                continue
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
        with self._lock:
            seen_total, seen_count = self._seen
            if count > seen_count:
                self.seconds = (total - seen_total) / (count - seen_count)
            self._seen = (total, count)
            return self.seconds


def usable_threads(rate: float, call_s: float, cap: int, work: int) -> int:
    """The worker threads the fleet can keep busy now: the jobs there are (waiting and
    running), but no more than the global rate keeps busy (calls per second x seconds a call
    holds a thread: Little's law) and no more than the in-flight cap. What scales the fleet
    (deploy/k8s/keda-scaledobject.yaml): behind a rate limit, a longer queue needs no more
    threads, only a slower API does."""
    usable = work
    if rate > 0:
        usable = min(usable, math.ceil(rate * call_s))
    if cap > 0:
        usable = min(usable, cap)
    return max(0, usable)


def _pairs(flat: list[Any]) -> dict[str, int]:
    """A flat [field, value, ...] reply as {field: int}."""
    return {text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _flat(mapping: dict[Any, Any]) -> list[Any]:
    return [item for pair in mapping.items() for item in pair]


def _by_account(sums: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix("acct:"): v for k, v in sums.items() if k.startswith("acct:")}


@dataclass(frozen=True)
class Memory:
    """What one Redis says of its memory (INFO memory and stats)."""

    role: str  # broker, or state (only when LIMITER_REDIS_URL names another Redis)
    used: int
    maximum: int  # maxmemory; 0: no limit
    policy: str
    evicted: int  # keys evicted since the server started


@dataclass(frozen=True)
class Reading:
    """One reading of both Redis scripts, and of each Redis's memory."""

    limits: list[Any]  # gauges.lua's reply
    money: list[Any] | None  # money_gauges.lua's reply; None when this process does not report
    memory: list[Memory]
    waiting: dict[str, dict[str, tuple[int, float]]]  # class -> account -> (depth, oldest age)
    awaited: tuple[int, float] = (0, 0.0)  # calls expecting a webhook, the oldest's wait (s)


def _memory(role: str, client: redis.Redis) -> Memory | None:
    """None when this Redis refuses INFO (an ACL user without it): the other gauges stay."""
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.info("memory")
            pipe.info("stats")
            memory, stats = pipe.execute()
    except redis.ResponseError as exc:
        logger.debug("No memory figures from the %s Redis: %s", role, exc)
        return None
    return Memory(
        role=role,
        used=int(memory.get("used_memory", 0)),
        maximum=int(memory.get("maxmemory", 0)),
        policy=str(memory.get("maxmemory_policy", "")),
        evicted=int(stats.get("evicted_keys", 0)),
    )


class RedisStateCollector(Collector):
    """Gauges that live in Redis, so they describe the whole fleet, read when scraped."""

    def __init__(
        self,
        settings: Settings,
        queues: Iterable[str],
        ident: str = "",
        recent_calls: RecentCalls | None = None,
    ) -> None:
        self.settings = settings
        self.ident = ident  # this process's id in the dispatcher lock
        self.queues = sorted(set(queues))
        keys, state_keys = FairKeys(settings.key_prefix), StateKeys(settings.key_prefix)
        self.state_keys = state_keys
        self.broker = broker_redis(settings)
        self.state = redis_client(settings)
        self._roles = [("broker", self.broker)]
        if settings.limiter_url != settings.broker_url:
            self._roles.append(("state", self.state))
        self._gauges = scripts.register(self.broker, "gauges")
        self._accounts = scripts.register(self.broker, "gauges_accounts")
        self._class_keys = {
            k: [keys.active(k), keys.queue_prefix(k)] for k in PRIORITY_CLASSES.values()
        }
        self._money = scripts.register(self.state, "money_gauges")
        self._script_keys = [
            keys.intake,
            keys.delayed,
            keys.ready,
            keys.leases,
            keys.cooldown,
            keys.strikes,
            keys.overrides,
            keys.dispatcher,
            *celery_queue_keys(self.queues),
        ]
        self._lock = threading.Lock()
        self._cached: tuple[float, Reading] | None = None
        self.ttl_s = READING_TTL_S
        self.recent_calls = recent_calls or RecentCalls()

    def read(self) -> Reading:
        """Both scripts' replies, shared by scrapes within READING_TTL_S of each other."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            keys = self.state_keys
            money_keys = [
                keys.day(utc_day()),
                keys.reservations,
                keys.reservations_due,
                keys.reserved_sums,
                keys.dead_letters,
            ]
            limits = scripts.run(self._gauges, self._script_keys, [self.ident])
            reports = self._reports(limits)
            money = scripts.run(self._money, money_keys, []) if reports else None
            if money is not None:  # today's per-account totals, in bounded chunks
                money[2] = [*money[2], *self._spent_by_account(money_keys[0])]
                # The budgets of accounts set at run time (as few as the operator set).
                money.append(_flat(self.state.hgetall(keys.budgets)))
            memory = [m for role, client in self._roles if reports and (m := _memory(role, client))]
            waiting = self._waiting() if reports else {}
            hooks = reports and self.settings.runware_webhook_url is not None
            awaited = self._awaited() if hooks else (0, 0.0)
            reading = Reading(limits, money, memory, waiting, awaited)
            self._cached = (now, reading)
            return reading

    def _awaited(self) -> tuple[int, float]:
        """Calls that expect a webhook (tasks/webhooks.py), and how long the oldest waited."""
        pipe = self.state.pipeline(transaction=False)
        pipe.zcard(self.state_keys.hooks_awaited)
        pipe.zrange(self.state_keys.hooks_awaited, 0, 0, withscores=True)
        count, oldest = pipe.execute()
        return int(count), max(0.0, time.time() - float(oldest[0][1])) if oldest else 0.0

    def _waiting(self) -> dict[str, dict[str, tuple[int, float]]]:
        """Every waiting account's depth and oldest wait, per class, read a chunk per call."""
        found: dict[str, dict[str, tuple[int, float]]] = {}
        for klass, class_keys in self._class_keys.items():
            rows = found[klass] = {}
            cursor = "0"
            while True:
                reply = scripts.run(self._accounts, class_keys, [cursor, ACCOUNTS_PER_CALL])
                cursor = text(reply[0])
                for index in range(1, len(reply), 3):
                    account, depth, age = reply[index : index + 3]
                    rows[text(account)] = (int(depth), float(age))
                if cursor == "0":
                    break
        return found

    def collect(self) -> Iterator[Metric]:
        try:
            reading = self.read()
        except redis.RedisError as exc:
            logger.warning("Could not read the fleet's gauges from Redis: %s", exc)
            return
        if reading.money is None:  # METRICS_FLEET_GAUGES=dispatcher, and another holds it
            return
        yield from self._backlog_and_limits(reading.limits, reading.waiting)
        yield from self._money_figures(reading.money)
        yield from _memory_figures(reading.memory)
        count, oldest = reading.awaited
        yield GaugeMetricFamily(
            "enhance_webhooks_awaited",
            "Async calls waiting for Runware's webhook (RUNWARE_WEBHOOK_URL).",
            value=count,
        )
        yield GaugeMetricFamily(
            "enhance_webhooks_awaited_oldest_seconds",
            "How long the oldest call waiting for a webhook has waited.",
            value=oldest,
        )

    def _reports(self, limits: list[Any]) -> bool:
        """Whether this process reports the fleet's gauges now (gauges.lua's 9th value: it holds
        the dispatcher role)."""
        return self.settings.metrics_fleet_gauges == "every" or int(limits[8]) == 1

    def _backlog_and_limits(
        self, reply: list[Any], waiting_by_class: dict[str, dict[str, tuple[int, float]]]
    ) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "enhance_queue_depth",
            "Jobs waiting to run: in the broker queue, the fair queues and the ready queue.",
            labels=["queue"],
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
        incoming, delayed, ready, leases = (int(v) for v in reply[:4])
        cooldown_s, strikes = float(reply[4]), int(reply[5])
        cap_override, rate_override = text(reply[6]), text(reply[7])
        by_class = {
            klass: [(account, depth, age) for account, (depth, age) in rows.items()]
            for klass, rows in waiting_by_class.items()
        }
        fair = sum(row[1] for rows in by_class.values() for row in rows)
        top = self.settings.metrics_top_accounts
        for klass, rows in by_class.items():
            # The accounts with the most waiting have series of their own; the rest are summed
            # (their oldest wait: the longest) under "(other)".
            rows.sort(key=lambda row: (-row[1], -row[2], row[0]))
            for account, count, age in rows[:top]:
                waiting.add_metric([account, PRIORITY_NAMES[klass]], count)
                oldest.add_metric([account, PRIORITY_NAMES[klass]], age)
            if rows[top:]:
                rest = rows[top:]
                labels = [OTHER, PRIORITY_NAMES[klass]]
                waiting.add_metric(labels, sum(row[1] for row in rest))
                oldest.add_metric(labels, max(row[2] for row in rest))
        # One queue in practice (`enhance`); the fair and ready jobs are counted under the first.
        for position, queue in enumerate(self.queues):
            depth.add_metric([queue], (incoming + fair + ready) if position == 0 else 0)
        yield from (depth, waiting, oldest)
        yield GaugeMetricFamily(
            "enhance_delayed_jobs",
            "Jobs waiting for their countdown (retries, polls, ETAs), kept in Redis.",
            value=delayed,
        )
        yield GaugeMetricFamily(
            "enhance_fleet_in_flight_calls",
            "Jobs granted a slot and not finished, across the whole fleet.",
            value=leases,
        )
        cap = int(cap_override) if cap_override else self.settings.runware_max_in_flight
        if cap:  # 0 or unset: no cap
            yield GaugeMetricFamily(
                "enhance_fleet_in_flight_cap",
                "The fleet's cap on calls in flight (RUNWARE_MAX_IN_FLIGHT or its override).",
                value=cap,
            )
        rate = float(rate_override) if rate_override else self.settings.runware_rate_limit
        if rate:
            yield GaugeMetricFamily(
                "enhance_fleet_rate_limit_calls_per_second",
                "The fleet's rate limit (RUNWARE_RATE_LIMIT or its override), calls per second.",
                value=rate,
            )
        call_s = self.recent_calls.read()
        if call_s is not None:  # no call measured yet: no figure rather than a guessed one
            yield GaugeMetricFamily(
                "enhance_runware_recent_call_seconds",
                "Mean duration of this worker's Runware calls since the previous scrape.",
                value=call_s,
            )
            yield GaugeMetricFamily(
                "enhance_fleet_usable_threads",
                "Worker threads the fleet can keep busy now: the jobs waiting and running, "
                "capped by the global rate x the recent call duration and by the in-flight cap. "
                "KEDA scales the workers on it.",
                # (a granted job waiting in the ready queue holds a lease already)
                value=usable_threads(rate or 0.0, call_s, cap or 0, incoming + fair + leases),
            )
        yield GaugeMetricFamily(
            "enhance_fleet_paused",
            "1 while every call of the fleet is paused because Runware refused the API key "
            "(`enhance-worker limits show` says why), else 0.",
            value=int(reply[9]),
        )
        yield GaugeMetricFamily(
            "enhance_cooldown_active",
            "1 while the fleet pauses because Runware throttled it (429 or 503), else 0.",
            value=1 if cooldown_s > 0 else 0,
        )
        yield GaugeMetricFamily(
            "enhance_cooldown_seconds_left",
            "Seconds left of the fleet's cool-down.",
            value=cooldown_s,
        )
        yield GaugeMetricFamily(
            "enhance_cooldown_strikes",
            "Throttled answers since Runware last answered the fleet normally (0: not throttled).",
            value=strikes,
        )

    def _spent_by_account(self, day_key: str) -> list[Any]:
        """Today's `acct:<a>` fields (flat), read DAY_FIELDS_PER_CALL at a time: with 10,000
        accounts the hash holds 20,000 fields, and one HGETALL of it held Redis 15-20 ms."""
        flat: list[Any] = []
        for field, value in self.state.hscan_iter(
            day_key, match="acct:*", count=DAY_FIELDS_PER_CALL
        ):
            flat.extend((field, value))
        return flat

    def _money_figures(self, reply: list[Any]) -> Iterator[Metric]:
        settings = self.settings
        dead, unsettled_calls = int(reply[0]), int(reply[1])
        day, reserved, unsettled = _pairs(reply[2]), _pairs(reply[3]), _pairs(reply[4])
        spent_by, reserved_by = _by_account(day), _by_account(reserved)
        unsettled_by = _by_account(unsettled)
        # The accounts holding the most money today have series of their own; the rest are
        # summed under "(other)" (their budget figures: the fullest one's).
        ranked = sorted(
            set(spent_by) | set(reserved_by),
            key=lambda a: (-(spent_by.get(a, 0) + reserved_by.get(a, 0)), a),
        )
        top, rest = ranked[: settings.metrics_top_accounts], ranked[settings.metrics_top_accounts :]
        accounts = sorted(top) + ([OTHER] if rest else [])
        if rest:
            for sums in (spent_by, reserved_by, unsettled_by):
                sums[OTHER] = sum(sums.get(a, 0) for a in rest)

        def per_scope(
            names: tuple[str, str], help_text: str, sums: dict[str, int], by: dict[str, int]
        ) -> Iterator[Metric]:
            """The fleet's figure ('total') and each account's, as two gauges."""
            fleet_name, account_name = names
            yield GaugeMetricFamily(
                fleet_name, f"{help_text}, whole fleet.", value=sums.get("total", 0) / MICRO
            )
            family = GaugeMetricFamily(account_name, f"{help_text}.", labels=["account"])
            for account in accounts:
                family.add_metric([account], by.get(account, 0) / MICRO)
            yield family

        yield GaugeMetricFamily(
            "enhance_dead_letter_jobs",
            "Jobs in the dead-letter list (enhance-worker failed).",
            value=dead,
        )
        yield from per_scope(
            ("enhance_fleet_spent_today_usd", "enhance_account_spent_today_usd"),
            "USD recorded in the ledger today (UTC)",
            day,
            spent_by,
        )
        yield from per_scope(
            ("enhance_fleet_reserved_usd", "enhance_account_reserved_usd"),
            "USD held against the budgets by calls not yet recorded (in progress or unsettled)",
            reserved,
            reserved_by,
        )
        yield from per_scope(
            ("enhance_fleet_unsettled_usd", "enhance_account_unsettled_usd"),
            "USD of unsettled calls (their job stopped following them) awaiting reconciliation",
            unsettled,
            unsettled_by,
        )
        yield GaugeMetricFamily(
            "enhance_unsettled_calls",
            "Calls whose cost is not known yet and whose job stopped following them.",
            value=unsettled_calls,
        )
        used = GaugeMetricFamily(
            "enhance_budget_used_ratio",
            "(Spent today + reserved) / the daily budget: 1 means the budget refuses new calls.",
            labels=["scope", "account"],
        )
        left = GaugeMetricFamily(
            "enhance_budget_left_usd",
            "The daily budget minus what is spent today and reserved.",
            labels=["scope", "account"],
        )
        limit = GaugeMetricFamily(
            "enhance_daily_budget_usd",
            "The daily budgets: RUNWARE_DAILY_BUDGET_USD (fleet) and "
            "RUNWARE_ACCOUNT_DAILY_BUDGET_USD (each account without a budget of its own).",
            labels=["scope"],
        )
        fleet_budget = settings.runware_daily_budget_usd
        if fleet_budget is not None:
            held = day.get("total", 0) + reserved.get("total", 0)
            _budget(used, left, "fleet", "", fleet_budget, held)
            limit.add_metric(["fleet"], fleet_budget)
        default = settings.runware_account_daily_budget_usd
        own = _pairs(reply[5]) if len(reply) > 5 else {}  # set at run time; -1: none

        def budget_of(account: str) -> float | None:
            micro = own.get(account)
            return default if micro is None else (None if micro < 0 else micro / MICRO)

        if default is not None:
            limit.add_metric(["account"], default)

        def held_by(account: str) -> int:
            return spent_by.get(account, 0) + reserved_by.get(account, 0)

        for account in accounts:
            if account == OTHER:  # the fullest of the rest: the one an alert is about
                budgeted = [(held_by(a), b) for a in rest if (b := budget_of(a)) is not None]
                if not budgeted:
                    continue
                held, budget = max(budgeted, key=lambda hb: hb[0] / hb[1] if hb[1] else math.inf)
            else:
                held, own_budget = held_by(account), budget_of(account)
                if own_budget is None:
                    continue
                budget = own_budget
            _budget(used, left, "account", account, budget, held)
        yield from (used, left, limit)


def _memory_figures(readings: list[Memory]) -> Iterator[Metric]:
    used = GaugeMetricFamily(
        "enhance_redis_used_memory_bytes",
        "Memory the Redis server uses (INFO used_memory), by role (broker; state when "
        "LIMITER_REDIS_URL names another Redis).",
        labels=["redis"],
    )
    limit = GaugeMetricFamily(
        "enhance_redis_maxmemory_bytes",
        "The Redis server's maxmemory (0: no limit): with the noeviction policy, writes are "
        "refused past it and the fleet stops.",
        labels=["redis"],
    )
    policy = GaugeMetricFamily(
        "enhance_redis_maxmemory_policy_info",
        "The Redis server's maxmemory-policy (noeviction is the only one that loses nothing).",
        labels=["redis", "policy"],
    )
    evicted = CounterMetricFamily(
        "enhance_redis_evicted_keys_total",
        "Keys the Redis server evicted since it started (INFO evicted_keys): jobs, results or "
        "ledger entries lost.",
        labels=["redis"],
    )
    for reading in readings:
        used.add_metric([reading.role], reading.used)
        limit.add_metric([reading.role], reading.maximum)
        policy.add_metric([reading.role, reading.policy], 1)
        evicted.add_metric([reading.role], reading.evicted)
    yield from (used, limit, policy, evicted)


def _budget(
    used: GaugeMetricFamily,
    left: GaugeMetricFamily,
    scope: str,
    account: str,
    budget_usd: float,
    held_micro: int,
) -> None:
    budget = round(budget_usd * MICRO)
    used.add_metric([scope, account], held_micro / budget if budget else 1.0)
    left.add_metric([scope, account], max(0, budget - held_micro) / MICRO)


def serve(settings: Settings, queues: Iterable[str], ident: str = "") -> None:
    """Serve /metrics on METRICS_PORT (all interfaces), if it is set."""
    if settings.metrics_port is None:
        return
    registry: CollectorRegistry = REGISTRY
    recent_calls = RecentCalls()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # prefork: add every child's values
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        children = multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        recent_calls = RecentCalls(children.collect)  # (the children make the calls)
    registry.register(RedisStateCollector(settings, queues, ident, recent_calls))
    server, _ = start_http_server(settings.metrics_port, registry=registry)
    # The port bound, which differs from METRICS_PORT=0's; tests read it from this line.
    logger.info("Prometheus metrics are served on port %d at /metrics.", server.server_port)
