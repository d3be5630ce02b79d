"""Every Redis connection the project makes is built here, from a URL, so that the broker, the
result backend, the limits and the ledger agree on what a URL means.

Accepted forms (redis-py's, and the same for every client):
- `redis://[[user]:password@]host[:port][/db]`
- `rediss://...` TLS, with redis-py's certificate options in the query string
  (`ssl_cert_reqs=required|optional|none`, `ssl_ca_certs=PATH`, `ssl_certfile=PATH`,
  `ssl_keyfile=PATH`, `ssl_check_hostname=true|false`); certificates are verified unless told
- `unix://[[user]:password@]/path/to/redis.sock[?db=N]`

kombu and Celery's result backend spell some of these differently (TLS options as
`broker_use_ssl` and `redis_backend_use_ssl`, sockets as `socket://`); `broker_options`,
`backend_url` and `ssl_options` translate.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_SSL_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# How many connections a process's clients may open: the worker's real concurrency (set when
# the worker starts, from -c or WORKER_CONCURRENCY), plus room for the process's own threads.
_concurrency = 10


def configure_concurrency(threads: int) -> None:
    """Size the pools of clients made from now on for `threads` concurrent jobs."""
    global _concurrency
    _concurrency = max(1, int(threads))


def pool_size() -> int:
    """The connection pool size of this process's clients: one per job thread, plus the
    dispatcher, heartbeat, metrics and a margin."""
    return _concurrency + 20


def is_redis(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def client(url: str) -> redis.Redis:
    """A redis-py client for `url` (any form above), with timeouts on connect and on every
    command, and a pool sized for this process."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
        max_connections=pool_size(),
    )


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a rediss:// URL as kombu and Celery take them (verification on unless
    the URL turns it off), or None for a URL without TLS."""
    if not url.startswith("rediss://"):
        return None
    query = _query(url)
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for name in _SSL_OPTIONS:
        if name not in query:
            continue
        raw = query[name]
        if name == "ssl_cert_reqs":
            options[name] = _CERT_REQS.get(raw.lower().removeprefix("cert_"), ssl.CERT_REQUIRED)
        elif name == "ssl_check_hostname":
            options[name] = raw.lower() not in ("false", "0", "no")
        else:
            options[name] = raw
    return options


def _without_query(url: str, drop: tuple[str, ...]) -> str:
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k not in drop]
    return parts._replace(query=urlencode(kept)).geturl()


def _socket_form(url: str) -> tuple[str, str]:
    """A unix:// URL as kombu's and Celery's `socket://` form: (URL, database number)."""
    parts = urlsplit(url)
    query = _query(url)
    db = query.pop("db", "0")
    auth = ""
    if parts.password is not None:
        auth = f"{parts.username or ''}:{parts.password}@"
    return f"socket://{auth}{parts.path}", db


def broker_options(url: str) -> tuple[str, dict[str, Any] | None]:
    """The broker URL as kombu takes it, and its TLS options (`broker_use_ssl`)."""
    if url.startswith("unix://"):
        socket_url, db = _socket_form(url)
        return f"redis+{socket_url}?virtual_host={db}", None
    return _without_query(url, _SSL_OPTIONS), ssl_options(url)


def backend_url(url: str) -> str:
    """The result backend URL as Celery's Redis backend takes it; a rediss:// URL's TLS options
    go to `redis_backend_use_ssl` (`ssl_options`)."""
    if url.startswith("unix://"):
        socket_url, db = _socket_form(url)
        return f"{socket_url}?virtual_host={db}"
    return _without_query(url, _SSL_OPTIONS)
