"""Every knob of the service, typed and validated, read from the environment (and `.env`).

This is the only module that reads the environment. A bad value raises `ConfigError` with one line
that names the variable and says what it accepts; the worker entry point turns that into an exit.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config import redis as redis_urls
from enhance_client.schemas import ENHANCE_MODEL

__all__ = ["ENHANCE_MODEL", "ConfigError", "Settings", "get_settings", "load_settings"]


class ConfigError(ValueError):
    """A setting has a value it does not accept; the message names the variable."""


_PER = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(value: object) -> float | None:
    """Calls per second from `N`, `N/s`, `N/m` or `N/h`; None (no limit) for empty or 0."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, per = float(value), 1.0
    elif isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        amount, _, unit = text.partition("/")
        if unit and unit not in _PER:
            raise ValueError("the unit after / must be s, m or h")
        try:
            number = float(amount)
        except ValueError:
            raise ValueError("must be a number, or N/s, N/m or N/h") from None
        per = _PER.get(unit, 1.0)
    else:
        raise ValueError("must be a number, or N/s, N/m or N/h")
    if number < 0 or number != number or number == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return number / per if number > 0 else None


def format_rate(per_second: float) -> str:
    """A rate in the unit it was most likely set in: per second from 1/s up; below that, per
    minute or per hour, whichever makes it a whole number (`20/m`, not 0.333...)."""
    if per_second >= 1:
        return f"{per_second:g}/s"
    for unit, seconds in (("m", 60.0), ("h", 3600.0)):
        value = per_second * seconds
        if value >= 1 and abs(value - round(value)) <= 1e-9 * value:
            return f"{round(value)}/{unit}"
    return f"{per_second * 60:.4g}/m"


PositiveFloat = Annotated[float, Field(gt=0)]


# What a job can take to come back, as the settings checks name it (Settings._comes_back_within_s).
_COMES_BACK = (
    "CELERY_VISIBILITY_TIMEOUT_S + the longest of RUNWARE_RETRY_BACKOFF_MAX_S, "
    "RUNWARE_RETRY_AFTER_MAX_S, RUNWARE_POLL_MAX_INTERVAL_S and, with webhooks, "
    "RUNWARE_WEBHOOK_POLL_S"
)


class Settings(BaseSettings):
    """The service's settings. Each field is read from the environment variable of its name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- Runware ---------------------------------------------------------------------------
    runware_api_key: SecretStr | None = Field(
        default=None,
        description="the Runware API key (a non-empty string); required for real calls",
    )
    runware_api_url: str = Field(
        default="https://api.runware.ai/v1",
        description="an http(s) URL of Runware's REST endpoint",
    )
    runware_webhook_url: str | None = Field(
        default=None,
        description="the public base URL (http or https) at which Runware reaches this "
        "project's webhook receiver (`enhance-worker webhooks`); when set, async calls are "
        "finished by Runware's webhook and polled only as a fallback",
    )
    runware_webhook_secret: SecretStr | None = Field(
        default=None,
        description="the secret the webhook URLs' per-call tokens are derived from; default: "
        "derived from RUNWARE_API_KEY (set it to keep the API key off the receiver)",
    )
    runware_webhook_poll_s: PositiveFloat = Field(
        default=60.0,
        description="seconds between getResponse polls of a call that expects a webhook (the "
        "fallback for a webhook that never comes), > 0",
    )
    runware_webhook_max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="largest webhook body the receiver accepts, in bytes, 1024..67108864",
    )
    runware_timeout_s: PositiveFloat = Field(
        default=30.0, description="seconds each HTTP call to Runware may take, a number > 0"
    )
    runware_connect_timeout_s: PositiveFloat = Field(
        default=5.0, description="seconds to open a connection to Runware, a number > 0"
    )
    runware_batch_max: int = Field(
        default=10,
        ge=1,
        le=100,
        description="most tasks this worker sends in one Runware request, an integer 1..100 "
        "(1: every task alone)",
    )
    runware_batch_window_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="the longest a request is held open (milliseconds) for jobs of the same "
        "process on their way to it, a number 0..1000",
    )
    runware_max_retries: int = Field(
        default=5, ge=0, le=100, description="retries of a transient failure, an integer 0..100"
    )
    runware_retry_backoff_s: PositiveFloat = Field(
        default=1.0, description="base of the exponential retry back-off in seconds, > 0"
    )
    runware_retry_backoff_max_s: PositiveFloat = Field(
        default=60.0, description="cap of one retry back-off in seconds, > 0"
    )
    runware_poll_interval_s: PositiveFloat = Field(
        default=2.0, description="first wait before polling an async task with getResponse, > 0"
    )
    runware_poll_max_interval_s: PositiveFloat = Field(
        default=15.0, description="longest wait between two polls of an async task, > 0"
    )
    runware_poll_timeout_s: PositiveFloat = Field(
        default=300.0,
        description="seconds an async enhancement or image may take before it fails with a "
        "timeout, > 0",
    )
    runware_video_timeout_s: PositiveFloat = Field(
        default=1800.0,
        description="seconds a video may take to render before it fails with a timeout, > 0",
    )

    # --- The fleet-wide limits (tasks/dispatcher.py) -----------------------------------------
    runware_rate_limit: float | None = Field(
        default=None,
        description="Runware calls per second across all workers: N, N/s, N/m or N/h; "
        "empty or 0 for no limit",
    )
    runware_rate_burst: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="calls that may go at once after a quiet spell, >= 1",
    )
    runware_account_rate_limit: float | None = Field(
        default=None,
        description="default calls per second of each account (N, N/s, N/m or N/h; empty or 0 "
        "for none); overridden per account with `enhance-worker limits set`",
    )
    runware_max_in_flight: int | None = Field(
        default=None,
        ge=0,
        description="most Runware calls open at once across all workers, an integer; "
        "empty or 0 for no cap",
    )
    runware_lease_s: PositiveFloat | None = Field(
        default=None,
        description="seconds an in-flight slot is held at most (a dead worker's slot comes back "
        "after it); default: the HTTP timeouts plus 5",
    )
    runware_cooldown_s: PositiveFloat = Field(
        default=1.0, description="first fleet-wide pause after a 429 or 503, doubling, > 0"
    )
    runware_cooldown_max_s: PositiveFloat = Field(
        default=30.0, description="longest fleet-wide pause after 429/503, > 0"
    )
    runware_retry_after_max_s: PositiveFloat = Field(
        default=300.0,
        description="longest Retry-After honoured (a longer one is cut to this), > 0",
    )
    # --- Cost ledger and budgets (tasks/ledger.py) ------------------------------------------
    runware_daily_budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="USD the whole fleet may spend per UTC day, a number >= 0; empty for none",
    )
    runware_account_daily_budget_usd: float | None = Field(
        default=None,
        ge=0,
        description="USD each account may spend per UTC day, a number >= 0; empty for none",
    )
    runware_enhance_cost_usd: float = Field(
        default=0.0013,
        ge=0,
        description="estimated USD of one promptEnhance version, reserved before the call, >= 0",
    )
    runware_image_cost_usd: float = Field(
        default=0.0019,
        ge=0,
        description="estimated USD of one generated image, reserved before the call, >= 0",
    )
    runware_video_cost_usd: float = Field(
        default=0.25,
        ge=0,
        description="estimated USD of one generated video, reserved before the call, >= 0",
    )
    runware_reservation_s: PositiveFloat = Field(
        default=900.0,
        description="seconds after its job last ran at which a call's reservation is checked "
        "with Runware (reconciled), > 0; longer than a job can take to come back",
    )
    runware_reconcile_s: PositiveFloat = Field(
        default=60.0,
        description="seconds between the workers' checks of unsettled calls with Runware, > 0",
    )
    runware_budget_wait_max_s: float = Field(
        default=3600.0,
        ge=0,
        description="seconds a job the budget refuses only until unsettled calls are "
        "reconciled waits for them (re-scheduled every RUNWARE_RECONCILE_S, its retries "
        "untouched) before such refusals count as retries, >= 0",
    )
    runware_items_retention_s: int = Field(
        default=3600,
        ge=60,
        description="seconds a finished call's items are kept in the ledger, so that a "
        "redelivered or retried job gets them without a call, an integer >= 60; longer than a "
        "job can take to come back",
    )
    runware_billed_retention_s: int = Field(
        default=8 * 86_400,
        ge=60,
        description="seconds a taskUUID's billed-once marker is kept: its cost is never counted "
        "twice while it lasts (a later resend is answered by Runware with the first result), "
        "an integer >= 60, at least RUNWARE_ITEMS_RETENTION_S",
    )
    runware_day_totals_retention_days: int = Field(
        default=400,
        ge=1,
        description="days the ledger's daily totals (fleet and per account) are kept, an "
        "integer >= 1",
    )
    limiter_redis_url: str | None = Field(
        default=None,
        description="a Redis URL for the ledger, poll markers and dead letters; default "
        "REDIS_URL (the limits and fair queues live in the broker's Redis)",
    )
    key_prefix: str = Field(
        default="enhance",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="prefix of this service's Redis keys (letters, digits, _.:-)",
    )

    # --- Redis and Celery ------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="a redis://, rediss://, unix:// or sentinel:// URL, broker and result "
        "backend unless overridden",
    )
    redis_sentinel_master: str | None = Field(
        default=None,
        description="the master's name in Sentinel, needed by sentinel:// URLs",
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None, description="the sentinels' own password, where they have one"
    )
    redis_wait_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description="replicas that must hold a call's recorded cost before its job is "
        "acknowledged (Redis WAIT), an integer 0..16; 1 behind Sentinel",
    )
    redis_wait_timeout_ms: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="milliseconds a job's end waits for those replicas, 1..10000",
    )
    celery_broker_url: str | None = Field(
        default=None, description="a broker URL overriding REDIS_URL for the broker"
    )
    celery_result_backend: str | None = Field(
        default=None, description="a result backend URL overriding REDIS_URL for results"
    )
    celery_task_default_queue: str = Field(
        default="enhance",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:@-]+$",
        description="the fleet's own Celery queue: the project's helpers send to it, workers "
        "read it unless -Q names others (not Celery's default `celery`, which other apps on "
        "the same Redis use)",
    )
    celery_result_expires_s: int = Field(
        default=86_400, ge=60, description="seconds results are kept, an integer >= 60"
    )
    celery_result_compression: Literal["gzip", "zlib", "bzip2", "lzma"] | None = Field(
        default="zlib",
        description="how a SUCCESS result is stored compressed: zlib (gzip is the same codec), "
        "bzip2, lzma, or none (then only one over 1 MiB is); a third to a half of the "
        "results' memory, read by Celery 5.7+",
    )
    worker_pool: Literal["threads", "prefork", "solo", "gevent", "eventlet"] = Field(
        default="threads", description="the worker pool: threads, prefork, solo, gevent, eventlet"
    )
    worker_concurrency: int = Field(
        default=200, ge=1, le=1000, description="tasks run at once by a worker, an integer 1..1000"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR (any case)"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or json (one JSON object per line, for log stacks)"
    )
    celery_visibility_timeout_s: int = Field(
        default=300,
        ge=1,
        description="seconds before an unacknowledged job of a dead worker is delivered again, "
        "an integer >= 1, longer than one run of a job (the Runware timeouts + 1)",
    )
    worker_soft_shutdown_s: float = Field(
        default=30.0,
        ge=0,
        description="seconds a worker lets running jobs finish on SIGTERM before it requeues "
        "them, >= 0",
    )
    metrics_fleet_gauges: Literal["every", "dispatcher"] = Field(
        default="every",
        description="which workers report the fleet-wide gauges read from Redis: every (the "
        "same value from each: aggregate with max) or dispatcher (only the one holding the "
        "dispatcher role: a sum is right too)",
    )
    metrics_top_accounts: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="accounts with series of their own in each per-account metric (the rest "
        'are summed under account "(other)"), an integer 1..10000',
    )
    metrics_account_idle_s: int = Field(
        default=900,
        ge=10,
        description="seconds after which an account with no activity loses its series in a "
        "worker's own per-account metrics, an integer >= 10",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="TCP port of the worker's Prometheus /metrics endpoint, 0..65535 (0: any "
        "free port, logged at start); unset for none",
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None, description="user:password pairs (comma-separated) that Flower requires"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        # Celery takes `-l info`; the same word is accepted here.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        # Flower takes an entry without a colon and then lets nobody in; say so here. (The
        # message never shows the value: it holds passwords.)
        if value is None:
            return None
        for number, entry in enumerate(value.get_secret_value().split(","), start=1):
            user, colon, password = entry.partition(":")
            if not (user.strip() and colon and password):
                raise ValueError(
                    f"entry {number} is not user:password (comma-separated pairs, each with "
                    "a user, a colon and a password)"
                )
        return value

    @field_validator("runware_api_url", "runware_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("runware_rate_limit", "runware_account_rate_limit", mode="before")
    @classmethod
    def _rate(cls, value: object) -> float | None:
        return parse_rate(value)

    @field_validator(
        "runware_max_in_flight",
        "runware_lease_s",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", 0, "0") else value

    @field_validator("metrics_port", "runware_webhook_url", mode="before")
    @classmethod
    def _blank_means_unset(cls, value: object) -> object:
        # 0 is a port here: the OS picks a free one (tests use it; the log names it).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("runware_daily_budget_usd", "runware_account_daily_budget_usd", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        # A budget of 0 means "spend nothing"; only an empty value means "no budget".
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("celery_result_compression", mode="before")
    @classmethod
    def _none_is_none(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return None if value in ("", "none") else value
        return value

    @field_validator("redis_url", "celery_broker_url", "celery_result_backend", "limiter_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as redis://host:6379/0")
        return value

    @field_validator("runware_api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # A secret file's trailing newline is not part of the key; a character no key holds
        # (a space, a control character) is refused here, without echoing the key, rather than
        # by requests as each call's Authorization header is built, in an error quoting it.
        key = value.get_secret_value().strip()
        if not key:
            return None
        if not key.isprintable() or any(c.isspace() for c in key):
            raise ValueError(
                "holds a space or a control character inside it (a Runware API key has none): "
                "check how it is set"
            )
        return SecretStr(key)

    @model_validator(mode="after")
    def _broker_is_redis(self) -> Settings:
        """The fair intake keeps its queues and the fleet's limits in the broker's Redis and
        moves broker messages there atomically: any other broker would stall every job."""
        if not redis_urls.is_redis(self.broker_url):
            name = "CELERY_BROKER_URL" if self.celery_broker_url else "REDIS_URL"
            raise ValueError(
                f"{name} must be a Redis URL (redis://, rediss://, unix:// or sentinel://) for "
                "the broker: "
                "the fair intake keeps the queues and the fleet's limits in the broker's Redis"
            )
        return self

    @model_validator(mode="after")
    def _sentinel_has_a_master(self) -> Settings:
        """A sentinel:// URL names the sentinels, not the master: without the group's name no
        client can find it."""
        for name, url in (
            ("REDIS_URL", self.redis_url),
            ("CELERY_BROKER_URL", self.celery_broker_url),
            ("CELERY_RESULT_BACKEND", self.celery_result_backend),
            ("LIMITER_REDIS_URL", self.limiter_redis_url),
        ):
            if url is None or not redis_urls.is_sentinel(url):
                continue
            if not self.redis_sentinel_master:
                raise ValueError(f"{name} is a sentinel:// URL: set REDIS_SENTINEL_MASTER too")
            try:
                redis_urls.sentinel_parts(url)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _visibility_outlasts_a_run(self) -> Settings:
        """A job is unacknowledged while it runs; if a run outlasts the visibility timeout, Redis
        hands the job to a second worker. A run makes at most one call to Runware; every wait
        (a countdown, a retry, a poll, a slot) is kept in Redis by the fair intake, not here."""
        # One call (connect and read timeouts), plus the batching window (at most 1 s).
        needed = self.runware_connect_timeout_s + self.runware_timeout_s + 1.0
        if self.celery_visibility_timeout_s <= needed:
            raise ValueError(
                f"CELERY_VISIBILITY_TIMEOUT_S={self.celery_visibility_timeout_s} must be longer "
                f"than the longest run of a job ({needed:g}s: RUNWARE_CONNECT_TIMEOUT_S + "
                "RUNWARE_TIMEOUT_S + 1)"
            )
        return self

    @property
    def _comes_back_within_s(self) -> float:
        """The longest a job can take to run again (_COMES_BACK says of what)."""
        return self.celery_visibility_timeout_s + max(
            self.runware_retry_backoff_max_s,
            self.runware_retry_after_max_s,
            self.runware_poll_max_interval_s,
            self.runware_webhook_poll_s if self.runware_webhook_url else 0.0,
        )

    @model_validator(mode="after")
    def _reservation_outlasts_a_redelivery(self) -> Settings:
        """A reservation becomes unsettled (and is checked with Runware) when its job has not
        run for RUNWARE_RESERVATION_S; a job that is still coming back must not look dead."""
        needed = self._comes_back_within_s
        if self.runware_reservation_s <= needed:
            raise ValueError(
                f"RUNWARE_RESERVATION_S={self.runware_reservation_s:g} must be longer than a job "
                f"can take to come back ({needed:g}s: {_COMES_BACK})"
            )
        return self

    @model_validator(mode="after")
    def _items_outlast_a_redelivery(self) -> Settings:
        """A job that comes back after its call ended (a redelivery, a retry) finds the call's
        items, and makes no call; the billed-once marker outlasts the items."""
        needed = self._comes_back_within_s
        if self.runware_items_retention_s <= needed:
            raise ValueError(
                f"RUNWARE_ITEMS_RETENTION_S={self.runware_items_retention_s} must be longer than "
                f"a job can take to come back ({needed:g}s: {_COMES_BACK})"
            )
        if self.runware_billed_retention_s < self.runware_items_retention_s:
            raise ValueError(
                f"RUNWARE_BILLED_RETENTION_S={self.runware_billed_retention_s} must be at least "
                f"RUNWARE_ITEMS_RETENTION_S={self.runware_items_retention_s}"
            )
        return self

    @property
    def broker_url(self) -> str:
        """The broker URL: CELERY_BROKER_URL, else REDIS_URL."""
        return self.celery_broker_url or self.redis_url

    @property
    def sentinel(self) -> redis_urls.Sentinel | None:
        """The Sentinel group of sentinel:// URLs (REDIS_SENTINEL_MASTER), if one is set."""
        if not self.redis_sentinel_master:
            return None
        password = self.redis_sentinel_password
        return redis_urls.Sentinel(
            self.redis_sentinel_master, password.get_secret_value() if password else None
        )

    @property
    def limiter_url(self) -> str:
        """Where the limiter and ledger keep their state: LIMITER_REDIS_URL, else REDIS_URL."""
        return self.limiter_redis_url or self.redis_url

    @property
    def lease_s(self) -> float:
        """How long an in-flight slot is held at most."""
        if self.runware_lease_s is not None:
            return self.runware_lease_s
        return self.runware_timeout_s + self.runware_connect_timeout_s + 5.0

    @property
    def result_backend(self) -> str:
        """The result backend URL: CELERY_RESULT_BACKEND, else REDIS_URL."""
        return self.celery_result_backend or self.redis_url


def _one_line(error: pydantic.ValidationError) -> str:
    """Render pydantic's ValidationError of the settings as one line per bad variable, never
    echoing a secret."""
    parts: list[str] = []
    for item in error.errors():
        if not item["loc"]:  # a check across several settings: its message names them
            parts.append(str(item["msg"]).removeprefix("Value error, "))
            continue
        field = str(item["loc"][0])
        info = Settings.model_fields.get(field)
        accepts = info.description if info is not None and info.description else "see README"
        hidden = any(word in field for word in ("key", "secret", "password", "auth")) or (
            info is not None and "SecretStr" in str(info.annotation)
        )
        shown: Any = "<hidden>" if hidden else item.get("input")
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{field.upper()}={shown!r} is not accepted ({message}); expected {accepts}")
    return "invalid configuration: " + "; ".join(parts)


# Prefixes of the variables this service reads; another variable under one is likely a typo.
CHECKED_PREFIXES = ("RUNWARE_", "REDIS_", "CELERY_")
# Variables under those prefixes that Celery itself reads from the environment.
CELERY_OWN = frozenset(
    {
        "CELERY_BENCH", "CELERY_BENCH_EVERY", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL",
        "CELERY_CONFIG_MODULE", "CELERY_CUSTOM_WORKER_POOL", "CELERY_LOADER", "CELERY_LOG_FILE",
        "CELERY_LOG_LEVEL", "CELERY_LOG_REDIRECT", "CELERY_LOG_REDIRECT_LEVEL", "CELERY_RDB_HOST",
        "CELERY_RDB_PORT", "CELERY_RDBSIG", "CELERY_SKIP_CHECKS", "CELERY_TRACE_APP",
    }
)  # fmt: skip


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line for each RUNWARE_*, REDIS_* or CELERY_* variable that no setting (nor Celery)
    reads, with the setting it may have meant: a misspelled name is otherwise silently
    ignored. `environ`: by default the process environment and the .env file the settings
    read."""
    if environ is None:
        environ = {**_dotenv_names(), **os.environ}
    known = {name.upper() for name in Settings.model_fields} | CELERY_OWN
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(CHECKED_PREFIXES) or upper in known:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{name} is set but is not a setting of this service (ignored){hint}")
    return lines


def _dotenv_names() -> dict[str, str]:
    from dotenv import dotenv_values

    path = Path(str(Settings.model_config.get("env_file") or ".env"))
    if not path.is_file():
        return {}
    return {name: "" for name in dotenv_values(path)}


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment (plus overrides), raising ConfigError on a bad value."""
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
