"""Every Redis connection the project makes is built here, from a URL, so that the broker, the
result backend, the limits and the ledger agree on what a URL means.

Accepted forms (redis-py's, and the same for every client):
- `redis://[[user]:password@]host[:port][/db]`
- `rediss://...` TLS, with redis-py's certificate options in the query string
  (`ssl_cert_reqs=required|optional|none`, `ssl_ca_certs=PATH`, `ssl_certfile=PATH`,
  `ssl_keyfile=PATH`, `ssl_check_hostname=true|false`); certificates are verified unless told
- `unix://[[user]:password@]/path/to/redis.sock[?db=N]`
- `sentinel://[[user]:password@]host[:port][/db];sentinel://host2[:port]...` (kombu's and
  Celery's form): the master of the group named by REDIS_SENTINEL_MASTER, found through these
  sentinels (default port 26379) and followed after a failover; the URL's password is the
  master's, REDIS_SENTINEL_PASSWORD the sentinels' own (`Sentinel`)

kombu and Celery's result backend spell some of these differently (TLS options as
`broker_use_ssl` and `redis_backend_use_ssl`, sockets as `socket://`); `broker_options`,
`backend_url` and `ssl_options` translate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.sentinel

SENTINEL_SCHEME = "sentinel://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
SENTINEL_PORT = 26379
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
_TIMEOUTS = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": COMMAND_TIMEOUT_S}
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


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class Sentinel:
    """How to find the master behind sentinel:// URLs: its group's name, and the sentinels'
    own password if they have one."""

    master: str
    password: str | None = None

    def transport_options(self) -> dict[str, Any]:
        """kombu's and Celery's transport options for this group (`master_name`,
        `sentinel_kwargs`)."""
        options: dict[str, Any] = {"master_name": self.master}
        if self.password:
            options["sentinel_kwargs"] = {"password": self.password}
        return options


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], int, str | None, str | None]:
    """A sentinel:// URL's sentinels (host, port), database, and the master's user and
    password (given on the first address, as kombu and Celery read them)."""
    hosts: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for n, chunk in enumerate(part for part in url.split(";") if part.strip()):
        parts = urlsplit(chunk.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel address: {chunk.strip().split('@')[-1]!r}")
        hosts.append((parts.hostname, parts.port or SENTINEL_PORT))
        if n == 0:
            path = parts.path.strip("/")
            db = int(path) if path else 0
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
    return hosts, db, username, password


def client(url: str, sentinel: Sentinel | None = None) -> redis.Redis:
    """A redis-py client for `url` (any form above), with timeouts on connect and on every
    command, and a pool sized for this process. A sentinel:// URL needs `sentinel`: the client
    then talks to the group's current master, and finds the new one after a failover."""
    if not is_sentinel(url):
        return redis.Redis.from_url(
            url, health_check_interval=30, max_connections=pool_size(), **_TIMEOUTS
        )
    if sentinel is None:
        raise ValueError("a sentinel:// URL needs the master's name (REDIS_SENTINEL_MASTER)")
    hosts, db, username, password = sentinel_parts(url)
    own: dict[str, Any] = dict(_TIMEOUTS)
    if sentinel.password:
        own["password"] = sentinel.password
    group = redis.sentinel.Sentinel(
        hosts,
        sentinel_kwargs=own,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
    )
    master: redis.Redis = group.master_for(
        sentinel.master,
        db=db,
        username=username,
        password=password,
        health_check_interval=30,
        max_connections=pool_size(),
    )
    return master


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
    if is_sentinel(url):
        return url, None
    if url.startswith("unix://"):
        socket_url, db = _socket_form(url)
        return f"redis+{socket_url}?virtual_host={db}", None
    return _without_query(url, _SSL_OPTIONS), ssl_options(url)


def backend_url(url: str) -> str:
    """The result backend URL as Celery's Redis backend takes it; a rediss:// URL's TLS options
    go to `redis_backend_use_ssl` (`ssl_options`)."""
    if is_sentinel(url):
        return url
    if url.startswith("unix://"):
        socket_url, db = _socket_form(url)
        return f"{socket_url}?virtual_host={db}"
    return _without_query(url, _SSL_OPTIONS)
