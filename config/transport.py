"""The broker transport: kombu's Redis transport, with two changes.

1. The fair intake's bookkeeping inside kombu's own transactions. The fleet's dispatcher
   (tasks/dispatcher.py) records every job it grants until a worker takes custody of it. kombu
   takes a message with BRPOP and then writes it to its unacknowledged set; a worker killed
   between the two lost the message (celery/kombu#305). Here the same MULTI/EXEC that writes
   kombu's unacknowledged entry also clears the dispatcher's record, so at every instant a
   granted message is either in the ready queue, or recorded (the dispatcher requeues it if it
   is in neither), or in kombu's unacknowledged set (kombu redelivers it after the visibility
   timeout). And the transaction that acknowledges a job also gives back its slot (the lease
   named by its delivery tag) and wakes the dispatcher, so a job costs no round trip for it.
2. A message no worker can read, met in the ready queue, is set aside instead of stopping the
   worker. The fleet's dispatcher files such messages before any worker sees them; one pushed
   straight onto the ready queue (`enhance.ready`) still reaches a worker, where kombu's parsing
   raises outside any error Celery recovers from and the worker exits. Here the message goes to
   the dispatcher's list of unreadable messages (it files them in the dead letters, with their
   reason), and the worker goes on.
3. One redis-py client per connection pool. kombu builds a new `redis.Redis` for every publish,
   acknowledgement and unacked-index update; with redis-py 6 and later each one copies a table
   of some 250 reply callbacks, which the profile showed as 7% of the worker's CPU at full load.
   A Redis client is thread-safe, so this channel keeps one per pool.

Also `AMQP` (Celery's messaging class, named by config/celery.py) with a connection whose printable
URL masks a password only when there is one: kombu prints `redis://:**@host` for a URL with none,
in Celery's start-up banner and its "Connected to" line.

Everything else (connections, pools, TLS, acks, the visibility-timeout restore) is kombu's own.
`register()` (called by config/celery.py) makes it the transport of kombu's `redis`, `rediss`,
`redis+socket` and `sentinel` URL schemes in this process, so that broker URLs keep their usual
schemes: tools that pick a client by scheme, such as Flower's broker view, keep working.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.app.amqp import AMQP as CeleryAMQP
from kombu import Connection as KombuConnection
from kombu.exceptions import KombuError
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """kombu's QoS, whose unacknowledged-entry write also ends the dispatcher's transit record."""

    def append(self, message: Any, delivery_tag: str) -> None:
        channel: Any = self.channel
        info = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(
                self.unacked_key,
                delivery_tag,
                dumps([message._raw, info["exchange"], info["routing_key"]]),
            )
            if channel.fair_transit_key:
                pipe.hdel(channel.fair_transit_key, delivery_tag)
                pipe.zrem(channel.fair_transit_at_key, delivery_tag)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # An acknowledged (or rejected) job gives its slot back in the same transaction, and
        # wakes the dispatcher: no round trip of its own.
        kombus: Any = super()
        pipe = kombus._remove_from_indices(delivery_tag, pipe)
        channel: Any = self.channel
        if channel.fair_leases_key:
            pipe.zrem(channel.fair_leases_key, delivery_tag)
            pipe.zrem(channel.fair_busy_key, delivery_tag)
            pipe.lpush(channel.fair_wake_key, "1")
            pipe.ltrim(channel.fair_wake_key, 0, 15)
        return pipe


def unreadable(raw: bytes) -> bool:
    """Whether kombu cannot make a message of `raw` (what its parsing and QoS take for granted:
    a JSON object with a body, properties with a delivery tag, and delivery info naming an
    exchange and a routing key)."""
    try:
        env = loads(raw)
        props = env["properties"]
        info = props["delivery_info"]
        return not (
            isinstance(env.get("body", ""), str)
            and isinstance(props["delivery_tag"], str)
            and "exchange" in info
            and "routing_key" in info
        )
    except Exception:
        return True


class DueMessage(virtual.Message):
    """A message a worker took from the fair intake's ready queue: due now. The intake keeps a
    countdown or ETA in Redis and hands a job out only when it is due (by Redis's clock), or at
    once when Runware's webhook finished its call (tasks/webhooks.py); a worker that honoured
    the ETA as well would hold the job in its memory until then (or until its own clock, which
    may lag Redis's, says so). So the ETA is taken out before Celery reads the headers."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        headers = payload.get("headers") if isinstance(payload, dict) else None
        fair = getattr(channel, "fair_leases_key", "")
        if fair and isinstance(headers, dict) and headers.get("eta") is not None:
            headers["eta"] = None
        super().__init__(payload, channel=channel, **kwargs)


class Channel(kombu_redis.Channel):
    """A kombu Redis channel with the QoS above and one shared client per pool."""

    QoS = QoS
    Message = DueMessage
    fair_transit_key = ""
    fair_transit_at_key = ""
    fair_leases_key = ""
    fair_busy_key = ""
    fair_wake_key = ""
    fair_rejected_key = ""
    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "fair_transit_key",
        "fair_transit_at_key",
        "fair_leases_key",
        "fair_busy_key",
        "fair_wake_key",
        "fair_rejected_key",
    )
    _shared_client: Any = None
    _popped: Any = None  # the last BRPOP reply, while kombu parses and delivers it

    def _brpop_read(self, **options: Any) -> Any:
        kombus: Any = super()
        self._popped = None
        try:
            return kombus._brpop_read(**options)
        except Exception as exc:
            popped, self._popped = self._popped, None
            if not popped or not self.fair_rejected_key or isinstance(exc, virtual.Empty):
                raise
            # kombu counts KeyError among the connection errors: a message without its
            # properties is one, and Celery "reconnects", losing it. Any other connection error
            # is the broker's.
            channel: Any = self  # kombu-stubs lacks the channel's attributes
            broker = tuple(e for e in channel.connection_errors if e is not KeyError)
            if isinstance(exc, (KombuError, *broker)) or not unreadable(popped[1]):
                raise  # a readable message: the failure is not the message's (as before)
            self._set_aside(popped[1], exc)
            raise virtual.Empty() from None

    def _set_aside(self, raw: bytes, exc: Exception) -> None:
        """Hand a message that kombu could not read to the dispatcher, which files it in the
        dead letters; clear whatever kombu or the dispatcher recorded of it first, so it is not
        delivered again."""
        tag: Any = None
        with contextlib.suppress(Exception):  # no tag: nothing was recorded under one
            tag = loads(raw)["properties"]["delivery_tag"]
        client = self._create_client()
        with client.pipeline(transaction=True) as pipe:
            if isinstance(tag, str):
                pipe.hdel(self.unacked_key, tag)
                pipe.zrem(self.unacked_index_key, tag)
                if self.fair_transit_key:
                    pipe.hdel(self.fair_transit_key, tag)
                    pipe.zrem(self.fair_transit_at_key, tag)
                if self.fair_leases_key:  # its slot, if it was granted one
                    pipe.zrem(self.fair_leases_key, tag)
                    pipe.zrem(self.fair_busy_key, tag)
            pipe.lpush(self.fair_rejected_key, raw)
            pipe.lpush(self.fair_wake_key, "1")
            pipe.ltrim(self.fair_wake_key, 0, 15)
            pipe.execute()
        logger.error(
            "A message in the ready queue that no worker can read (%s: %s) was set aside for "
            "the dead letters (`enhance-worker failed list`).",
            type(exc).__name__,
            str(exc)[:200],
        )

    def _create_client(self, asynchronous: bool = False) -> Any:
        kombus: Any = super()  # kombu-stubs lacks the channel's private methods
        if asynchronous:  # the BRPOP/LISTEN client: kombu's own, one per channel anyway
            client = kombus._create_client(asynchronous=True)
            parse = client.parse_response

            def parse_response(connection: Any, command: str, **options: Any) -> Any:
                reply = parse(connection, command, **options)
                if command == "BRPOP":
                    self._popped = reply  # kept for _brpop_read, should kombu fail to read it
                return reply

            client.parse_response = parse_response
            return client

        if self.connection.client is None:
            # The connection was closed under this channel (Redis went away) and kombu still
            # asks for a client (to restore or ack): say so as the connection error it is,
            # which Celery recovers from, rather than kombu's AttributeError, which stops the
            # worker. An unacknowledged job stays in Redis and is delivered again.
            raise redis.ConnectionError("the broker connection is closed")
        pool = self.pool  # a new one after a fork or a reconnect
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = kombus._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above, on the current master of a Sentinel group (kombu's own discovery)."""

    from_transport_options = tuple(
        dict.fromkeys(
            (*Channel.from_transport_options, *kombu_redis.SentinelChannel.from_transport_options)
        )
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the channel above."""

    Channel = SentinelChannel


class Connection(KombuConnection):
    """kombu's connection; its URL as printed shows `redis://host`, not `redis://:**@host`, when
    it has no credentials at all (a password in any form, a unix socket's included, stays
    masked)."""

    def as_uri(
        self,
        include_password: bool = False,
        mask: str = "**",
        getfields: Callable[..., Any] | None = None,
    ) -> str:
        kombus: Any = super()
        more = {"getfields": getfields} if getfields is not None else {}
        full: str = kombus.as_uri(True, mask, **more)
        if include_password or "@" not in full.partition("://")[2].split("/", 1)[0]:
            return full  # no credentials in it at all: nothing to mask
        masked: str = kombus.as_uri(False, mask, **more)
        return masked


class AMQP(CeleryAMQP):
    """Celery's messaging, with the connection above."""

    Connection = Connection
    BrokerConnection = Connection


def register() -> None:
    """Use these transports for redis://, rediss://, redis+socket:// and sentinel:// broker
    URLs."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = "config.transport:Transport"
    TRANSPORT_ALIASES["sentinel"] = "config.transport:SentinelTransport"
