"""Shared test fixtures: a private redis-server, the Runware sandbox and real worker processes.

Nothing here touches a Redis the machine may already run: the suite starts its own on a free port
(the PATH's redis-server, or the embedded one) before any project module is imported.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# hypothesis is imported now, before any test starts threads: its pytest plugin imports it at the
# end of a session that did not, and on CPython 3.11.7 that late parse (pytest rewrites its
# modules) failed with "SystemError: AST constructor recursion depth mismatch" after the asyncio
# tests of test_waiting.py ran, failing a run whose tests had all passed.
import hypothesis  # noqa: F401
import pytest
import requests
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.producer import backend_app
from workers.sandbox import Sandbox, SandboxConfig
from workers.sandbox.services import RedisServer, WorkerProcess

# A key nobody would type: every scan for leaks looks for this exact string.
SECRET = "rw-test-9f3c7e1d4b2a-do-not-leak"

# Settings under which a dead worker's jobs are delivered again after about 12 s (the visibility
# timeout must outlast one run of a job: the Runware timeouts, so the connect timeout is short).
FAST_REDELIVERY = {
    "CELERY_VISIBILITY_TIMEOUT_S": "10",
    "RUNWARE_CONNECT_TIMEOUT_S": "1",
}

_redis: RedisServer | None = None
# Databases 0..63 are the tests' fixed ones (1: the shared worker's); each worker of
# start_worker gets one of its own above them (the private redis-server has 256).
_dbs = itertools.count(64)


def pytest_configure(config: pytest.Config) -> None:
    """Start the suite's own Redis before test modules import the project's Celery app."""
    global _redis
    from config.settings import Settings

    _redis = RedisServer().start()
    # The suite runs on its own settings, whatever the shell exports (the test workers inherit
    # this environment): every setting of the service is cleared.
    for name in Settings.model_fields:
        os.environ.pop(name.upper(), None)
    os.environ["REDIS_URL"] = _redis.url(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _redis is not None:
        _redis.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    assert _redis is not None
    return _redis


def _sandbox_config() -> SandboxConfig:
    """The suite's sandbox as every test starts with it."""
    return SandboxConfig(api_key=SECRET, seed=7, async_delay_s=0.3, video_render_s=1.0)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(config=_sandbox_config()) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with a sandbox that has seen nothing and injects nothing."""
    if "sandbox" not in request.fixturenames:
        yield
        return
    server: Sandbox = request.getfixturevalue("sandbox")
    # Every setting as the suite started it (costs, delays, hang time and faults included), the
    # fault generator seeded afresh, and nothing seen or billed.
    initial = _sandbox_config()
    server.configure(**{f.name: getattr(initial, f.name) for f in dataclasses.fields(initial)})
    server.state.random.seed(initial.seed)
    server.state.reset()
    yield


def wait_until(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll `check` every 0.1 s until it is true; the seconds that took. Fails the test, naming
    `what`, after `timeout` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def run_cli(
    redis_url: str,
    *args: str,
    timeout: float = 180,
    check: bool = False,
    env_extra: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """`enhance-worker ARGS` as a user runs it, against `redis_url`."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**os.environ, "REDIS_URL": redis_url, **(env_extra or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        **kwargs,
    )


def worker_env(redis_url: str, sandbox: Sandbox, **overrides: str) -> dict[str, str]:
    """The environment of a test worker: fast retries, short timeouts, debug logs."""
    env = {
        "REDIS_URL": redis_url,
        "RUNWARE_API_URL": sandbox.url,
        "RUNWARE_API_KEY": SECRET,
        "RUNWARE_TIMEOUT_S": "1",
        "RUNWARE_MAX_RETRIES": "3",
        "RUNWARE_RETRY_BACKOFF_S": "0.05",
        "RUNWARE_RETRY_BACKOFF_MAX_S": "0.5",
        "RUNWARE_POLL_INTERVAL_S": "0.1",
        "RUNWARE_POLL_TIMEOUT_S": "20",
        "RUNWARE_COOLDOWN_S": "0.05",
        "RUNWARE_COOLDOWN_MAX_S": "0.5",
        "WORKER_CONCURRENCY": "8",
        # Unsettled calls left by one test are not reconciled into another's figures (the
        # tests of reconciliation set their own period).
        "RUNWARE_RECONCILE_S": "3600",
        "LOG_LEVEL": "DEBUG",
    }
    env.update(overrides)
    return env


@dataclass
class RunningWorker:
    """A worker process and a producer app on the same Redis database, as backend code has."""

    process: WorkerProcess
    redis_url: str
    app: Celery = field(init=False)

    def __post_init__(self) -> None:
        self.app = backend_app(broker=self.redis_url, backend=self.redis_url)

    def send(self, **kwargs: object) -> object:
        return self.app.send_task("tasks.enhance_prompt", kwargs=kwargs)


@pytest.fixture(scope="session")
def main_worker(redis_server: RedisServer, sandbox: Sandbox) -> Iterator[RunningWorker]:
    """The suite's shared worker, on database 1 (the one the project's own app points at)."""
    url = redis_server.url(1)
    process = WorkerProcess(worker_env(url, sandbox), name="main").start()
    running = RunningWorker(process, url)
    yield running
    running.app.close()
    process.stop()


StartWorker = Callable[..., RunningWorker]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def assert_billed_once(
    sandbox: Sandbox, results: list[Any], price_micro: int = 1300, ledger: int | None = None
) -> None:
    """Runware accepted each job's taskUUID and nothing else, and billed N x price (and the
    ledger, where given, the same). The sandbox answers 409 to a taskUUID it has seen, so a job
    billed twice shows up as an extra taskUUID (sent again under a new one), never as a count
    above 1: counting acceptances per taskUUID could not fail."""
    uuids = {r["taskUUID"] for r in results}
    assert len(uuids) == len(results), "two jobs share a taskUUID"
    extra = set(sandbox.state.accepted) - uuids
    assert not extra, f"Runware accepted {len(extra)} taskUUIDs no result has: billed twice"
    assert set(sandbox.state.accepted) == uuids
    assert sandbox.state.billed_micro == len(uuids) * price_micro
    if ledger is not None:
        assert ledger == sandbox.state.billed_micro


def metrics_port(worker: RunningWorker) -> int:
    """The port a worker started with METRICS_PORT=0 bound (WorkerProcess.metrics_port)."""
    return worker.process.metrics_port()


def scrape_metrics(port: int) -> Samples:
    """A worker's /metrics, as {(sample name, sorted labels): value}."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def start_worker(redis_server: RedisServer, sandbox: Sandbox) -> Iterator[StartWorker]:
    """Start a worker with its own settings on a database of its own; stopped after the test."""
    started: list[RunningWorker] = []

    def start(
        name: str = "extra",
        same_db_as: RunningWorker | None = None,
        app: str = "workers",
        **overrides: str,
    ) -> RunningWorker:
        url = same_db_as.redis_url if same_db_as else redis_server.url(next(_dbs))
        env = worker_env(url, sandbox, **overrides)
        process = WorkerProcess(env, name=f"{name}{len(started)}", app=app).start()
        running = RunningWorker(process, url)
        started.append(running)
        return running

    yield start
    for running in started:
        running.app.close()
        running.process.stop()
