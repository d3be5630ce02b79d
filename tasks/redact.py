"""Keeping secrets out of logs, Flower and task headers.

Secrets here: the Runware API key, a URL's query string (webhook tokens live there) and a
URL's user:password part (a Redis URL's password). `redact` masks all three in any text.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from config.settings import get_settings
from enhance_client.masking import mask_urls


def _api_key() -> str | None:
    try:
        key = get_settings().runware_api_key
    except ValueError:
        return None
    return key.get_secret_value() if key is not None else None


def mask(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by <redacted>."""
    if secret and secret in text:
        return text.replace(secret, "<redacted>")
    return text


def redact(text: str) -> str:
    """`text` with URL query strings, URL credentials and the API key masked."""
    return mask(mask_urls(text), _api_key())


@signals.before_task_publish.connect
def _mask_argument_reprs(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every job this project publishes (helpers, retries, re-schedules) shows Flower and the
    worker's logs arguments with webhook tokens masked, never the raw values."""
    if not headers:
        return
    for name in ("argsrepr", "kwargsrepr"):
        value = headers.get(name)
        if isinstance(value, str):
            headers[name] = redact(value)


@signals.task_received.connect
def _mask_received_reprs(request: Any = None, **_: Any) -> None:
    """A job published by any other producer (a plain Celery app, `send_task` by name) carries
    the raw argument reprs: mask them as the worker receives it, before its task-received
    event tells Flower."""
    if request is None:
        return
    for name in ("_argsrepr", "_kwargsrepr"):
        value = getattr(request, name, None)
        if isinstance(value, str):
            setattr(request, name, redact(value))
