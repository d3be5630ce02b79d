"""Celery's Redis result backends, without subscribing to each result as its job is sent.

Celery's Redis backend subscribes its result consumer to every result a process sends, as it
sends it, and each `.get()` then drains the messages of all of them: behind thousands sent, a
`.get()` sees its own result late, and the results nobody waits for pile up unread on the
pub/sub connection. A `.get()` subscribes to its own result anyway (then reads the stored
value), and `enhance_client.wait`/`wait_async` wait on one result each, so here nothing is
subscribed at send time.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend

_SCHEMES = {
    "redis": "QuietRedisBackend",
    "rediss": "QuietRedisBackend",
    "unix": "QuietRedisBackend",
    "socket": "QuietRedisBackend",
    "sentinel": "QuietSentinelBackend",
}


class QuietRedisBackend(RedisBackend):
    """Celery's RedisBackend, minus the subscription at send (see the module docstring)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing: a result is subscribed to when something waits for it."""


class QuietSentinelBackend(QuietRedisBackend, SentinelBackend):
    """The same behind Redis Sentinel."""


def quiet_backend_url(url: str) -> str:
    """`url` as a Celery result-backend URL that selects the quiet backend for its scheme (any
    other backend URL as it is)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    name = _SCHEMES.get(scheme)
    return f"enhance_client.backends:{name}+{url}" if name else url
