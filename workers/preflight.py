"""What the command line checks before it enqueues anything, and how it reports a failure: one
line that says what is wrong and what to do, with an exit status of its own (a traceback only
with `enhance-worker -v`).

| status | meaning |
| --- | --- |
| 1 | a job failed (its reason is printed) |
| 2 | bad input or a bad setting: nothing was enqueued |
| 3 | no Redis answers at the configured URL |
| 4 | no worker is running, or no result came in time: the jobs stay queued |
| 5 | a daily budget is spent |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import redis
from celery.exceptions import TimeoutError as ResultTimeout
from kombu.exceptions import OperationalError

from config import redis as redis_urls
from config.keys import FairKeys
from config.settings import ConfigError, Settings

FAILED, USAGE, NO_REDIS, NO_WORKER, BUDGET, INTERRUPTED = 1, 2, 3, 4, 5, 130
START_A_WORKER = "start one with `celery -A workers worker` (or `./run worker`)"


class CommandError(Exception):
    """A failure the command explains in one line, with its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def redact(text: str) -> str:
    """`text` as it may be shown (tasks/redact.py; imported here on use, since importing the
    tasks package reads the settings, which may be what is wrong)."""
    from tasks.redact import redact as mask_secrets

    return mask_secrets(text)


def where(url: str) -> str:
    """A Redis URL as it may be shown: without its password."""
    return redact(url)


def require_redis(settings: Settings) -> None:
    """Fail at once, naming the URL, when the broker's or the result backend's Redis does not
    answer (rather than Celery's 20 s of retries and a long traceback)."""
    urls = [settings.broker_url, settings.result_backend]
    for url in dict.fromkeys(u for u in urls if redis_urls.is_redis(u)):
        client = redis_urls.client(url, settings.sentinel)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise CommandError(
                f"no Redis answers at {where(url)} ({type(exc).__name__}: {redact(str(exc))}); "
                "start redis-server, or set REDIS_URL to the one your workers use",
                NO_REDIS,
            ) from None
        finally:
            client.close()


def running_workers(settings: Settings) -> int:
    """How many worker processes have a live heartbeat in the broker's Redis."""
    from tasks.dispatcher import live_workers
    from tasks.limiter import broker_redis

    client = broker_redis(settings)
    try:
        return len(live_workers(client, FairKeys(settings.key_prefix)))
    finally:
        client.close()


def require_worker(settings: Settings) -> None:
    """Refuse to enqueue when no worker runs: the jobs would wait in Redis unseen, and run (and
    be billed) whenever a worker starts."""
    if not running_workers(settings):
        raise CommandError(
            f"no worker is running on the Redis at {where(settings.broker_url)}, so nothing was "
            f"enqueued (jobs would wait there, and run and be billed when a worker starts); "
            f"{START_A_WORKER}, then try again",
            NO_WORKER,
        )


def is_job_error(exc: BaseException) -> bool:
    """Whether `exc` is one of the service's own errors (tasks/errors.py's tree), matched by
    class name: Celery rebuilds a failed job's error from its name, and a process that had not
    imported tasks.errors gets a look-alike class of the same name."""
    try:
        from tasks.errors import WorkerError
    except ConfigError:  # importing the tasks package reads the settings
        return False
    names, classes = set(), [WorkerError]
    while classes:
        cls = classes.pop()
        names.add(cls.__name__)
        classes.extend(cls.__subclasses__())
    return type(exc).__name__ in names


def explain(exc: BaseException, settings: Settings | None) -> tuple[int, str]:
    """The exit status and the one line for an exception a command did not handle itself."""
    name = type(exc).__name__
    if isinstance(exc, CommandError):
        return exc.status, str(exc)
    if isinstance(exc, ConfigError):
        return USAGE, str(exc)
    if name == "ValidationError":  # tasks.errors's (pydantic's is turned into it first)
        return USAGE, str(exc)
    if name == "BudgetExceeded":
        return BUDGET, (
            f"a daily budget is spent: {exc}. Raise RUNWARE_DAILY_BUDGET_USD or "
            "RUNWARE_ACCOUNT_DAILY_BUDGET_USD, or wait for the next UTC day"
        )
    if is_job_error(exc):
        return FAILED, f"the job failed: {name}: {exc}"
    if isinstance(exc, redis.RedisError | OperationalError | ConnectionRefusedError):
        url = where(settings.broker_url) if settings is not None else "REDIS_URL"
        return NO_REDIS, f"no Redis answers at {url} ({name}: {redact(str(exc))})"
    if isinstance(exc, ResultTimeout):
        return NO_WORKER, f"no result in time ({exc})"
    return FAILED, f"{name}: {redact(str(exc))}"
