"""Every knob of the service, typed and validated, read from the environment (and `.env`).

This is the only module that reads the environment. A bad value raises `ConfigError` with one line
that names the variable and says what it accepts; the worker entry point turns that into an exit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENHANCE_MODEL = "runware:llama-3-1-8b@prompt-enhancer"


class ConfigError(ValueError):
    """A setting has a value it does not accept; the message names the variable."""


PositiveFloat = Annotated[float, Field(gt=0)]


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
    runware_timeout_s: PositiveFloat = Field(
        default=30.0, description="seconds each HTTP call to Runware may take, a number > 0"
    )
    runware_connect_timeout_s: PositiveFloat = Field(
        default=5.0, description="seconds to open a connection to Runware, a number > 0"
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
        default=1.5, description="first wait before polling an async task with getResponse, > 0"
    )
    runware_poll_timeout_s: PositiveFloat = Field(
        default=300.0,
        description="seconds an async task may take before it fails with a timeout, > 0",
    )

    # --- Redis and Celery ------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://localhost:6379/0",
        description="a redis:// or rediss:// URL, broker and result backend unless overridden",
    )
    celery_broker_url: str | None = Field(
        default=None, description="a broker URL overriding REDIS_URL for the broker"
    )
    celery_result_backend: str | None = Field(
        default=None, description="a result backend URL overriding REDIS_URL for results"
    )
    celery_result_expires_s: int = Field(
        default=86_400, ge=60, description="seconds results are kept, an integer >= 60"
    )
    worker_pool: Literal["threads", "prefork", "solo", "gevent", "eventlet"] = Field(
        default="threads", description="the worker pool: threads, prefork, solo, gevent, eventlet"
    )
    worker_concurrency: int = Field(
        default=32, ge=1, le=1000, description="tasks run at once by a worker, an integer 1..1000"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )

    @field_validator("runware_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("redis_url", "celery_broker_url", "celery_result_backend")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as redis://host:6379/0")
        return value

    @field_validator("runware_api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @property
    def broker_url(self) -> str:
        """The broker URL: CELERY_BROKER_URL, else REDIS_URL."""
        return self.celery_broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        """The result backend URL: CELERY_RESULT_BACKEND, else REDIS_URL."""
        return self.celery_result_backend or self.redis_url


def _one_line(error: ValidationError) -> str:
    """Render a settings ValidationError as one line per bad variable, never echoing a secret."""
    parts: list[str] = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        info = Settings.model_fields.get(field)
        accepts = info.description if info is not None and info.description else "see README"
        shown: Any = "<hidden>" if "key" in field or "secret" in field else item.get("input")
        parts.append(
            f"{field.upper()}={shown!r} is not accepted ({item['msg']}); expected {accepts}"
        )
    return "invalid configuration: " + "; ".join(parts)


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment (plus overrides), raising ConfigError on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()
