"""The broker transport: kombu's Redis transport, minus one redis-py client object per command.

kombu builds a new `redis.Redis` for every publish, acknowledgement and unacked-index update
(`Channel.conn_or_acquire`). With redis-py 6 and later each one copies a table of some 250 reply
callbacks, which the profile showed as 7% of the worker's CPU at full load. A Redis client is
thread-safe (each command borrows a connection from the pool), so this channel keeps one per
connection pool and hands out that one. The connections, the pool, and everything else are
kombu's own.

Selected in config/celery.py with Celery's `broker_transport` setting for redis:// broker URLs
(kombu sets up TLS for rediss:// only under its own transport name).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel whose plain (not BRPOP) commands share one client per pool."""

    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        kombus: Any = super()  # kombu-stubs lacks the channel's private methods
        if asynchronous:  # the BRPOP/LISTEN client: kombu's own, one per channel anyway
            return kombus._create_client(asynchronous=True)
        pool = self.pool  # a new one after a fork or a reconnect
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = kombus._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel
