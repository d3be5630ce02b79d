"""Waiting for results in the Redis result backend: from asyncio without blocking the loop, and
from threads, each seeing its result within milliseconds of it being stored, whatever else the
process waits for.

Celery's own `AsyncResult.get()` blocks (an event loop too), and its result consumer subscribes
to every result the process has sent, then drains all of them on each wait: behind thousands of
pending results, each `.get()` sees its own late. Here each wait subscribes to its own result's
channel only, for as long as it waits:

- per event loop, two `redis.asyncio` connections shared by every wait on that loop: one for
  reads (the reads asked for meanwhile go together in one MGET) and one pub/sub connection,
  whose reader task hands what is published to the waiting futures (no thread per wait);
- for threads (`wait`), the same, on one event loop in one daemon thread per process;
- a wait subscribes, waits for Redis to confirm it, then reads the stored value (so a result
  stored before the subscription is not missed), and gives the subscription up when it ends;
- a wait longer than a second also re-reads its stored value each second, which covers a
  message lost while the pub/sub connection reconnected.

The value is Celery's: a SUCCESS returns the task's return value, a FAILURE or REVOKED raises
the task's exception (rebuilt by the app's backend, as `.get()` does). A timeout raises
`celery.exceptions.TimeoutError` naming the task id; the job itself goes on. Cancelling an
`await` stops the wait only, never the job.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
from celery import states
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult, GroupResult, ResultBase

T = TypeVar("T")
logger = logging.getLogger(__name__)

RECHECK_S = 1.0  # a wait this old re-reads its stored value once a second
_CONNECTION_KEYS = frozenset(
    {
        "host",
        "port",
        "db",
        "username",
        "password",
        "credential_provider",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "health_check_interval",
        "client_name",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_check_hostname",
    }
)


def async_client_for(backend: Any) -> redis.asyncio.Redis:
    """A `redis.asyncio` client with the connection settings of a Celery Redis (or Sentinel)
    result backend: its host or socket, database, credentials and TLS options."""
    params = dict(backend.connparams)
    sentinels = params.pop("hosts", None)
    connection_class = params.pop("connection_class", None)
    options = {k: v for k, v in params.items() if k in _CONNECTION_KEYS and v is not None}
    if connection_class is not None and issubclass(
        connection_class, redis.UnixDomainSocketConnection
    ):
        options.pop("host", None)
        options.pop("port", None)
        options["unix_socket_path"] = params["path"]
    elif connection_class is not None and issubclass(connection_class, redis.SSLConnection):
        options["ssl"] = True
    if sentinels is not None:
        transport = backend.app.conf.get("result_backend_transport_options") or {}
        options.pop("host", None)
        options.pop("port", None)
        sentinel = redis.asyncio.sentinel.Sentinel(
            [(host["host"], host["port"]) for host in sentinels],
            sentinel_kwargs=transport.get("sentinel_kwargs") or {},
            **options,
        )
        client: redis.asyncio.Redis = sentinel.master_for(transport["master_name"])
        return client
    return redis.asyncio.Redis(**options)


def _key(backend: Any, task_id: str) -> bytes:
    key = backend.get_key_for_task(task_id)
    return key if isinstance(key, bytes) else str(key).encode()


def _value(backend: Any, meta: dict[str, Any]) -> Any:
    """What `.get()` gives for a ready result: its value, or its exception raised."""
    if meta["status"] in states.PROPAGATE_STATES:
        raise backend.exception_to_python(meta["result"])
    return meta["result"]


class AsyncWaiter:
    """The waits of one event loop on one result backend (see the module docstring)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.redis = async_client_for(backend)
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[bytes, list[asyncio.Future[dict[str, Any]]]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._subscriptions: dict[bytes, asyncio.Future[None]] = {}
        self._since: dict[bytes, float] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        # Waits ended by the once-a-second re-read, not by the read after subscribing or by a
        # message: each one is a result seen up to a second late (a reconnection, or a bug).
        self.found_late = 0
        self._to_read: set[bytes] = set()
        self._late: set[bytes] = set()
        self._reads_wanted = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None

    async def meta(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The stored meta of `task_id` once it is ready (SUCCESS, FAILURE or REVOKED)."""
        key = _key(self.backend, task_id)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(key, [])
        waiters.append(future)
        if len(waiters) == 1:
            self._since[key] = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                # One subscription per key, whichever of its waits asked first (and however
                # many of them are cancelled meanwhile); then each wait reads the stored value.
                subscribing = self._subscriptions.get(key)
                if subscribing is None or (
                    subscribing.done()
                    and (subscribing.cancelled() or subscribing.exception() is not None)
                ):
                    subscribing = self._subscriptions[key] = asyncio.ensure_future(
                        self._subscribe(key)
                    )
                await asyncio.shield(subscribing)
                self._read_soon(key)
                return await future
        except TimeoutError:
            raise ResultTimeout(
                f"task {task_id} was not ready within {timeout:g} s (the job goes on; wait "
                "again, or read it later by its id)"
            ) from None
        finally:
            waiters.remove(future)
            if not waiters and self._waiting.get(key) is waiters:
                del self._waiting[key]
                self._since.pop(key, None)
                self._subscriptions.pop(key, None)
                if self._pubsub is not None:
                    # Not awaited: a cancelled wait must not wait for Redis on its way out.
                    task = asyncio.ensure_future(self._unsubscribe(key))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    async def _subscribe(self, key: bytes) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmed[key] = confirmed
        try:
            async with self._lock:
                if self._pubsub is None:
                    self._pubsub = self.redis.pubsub()
                await self._pubsub.subscribe(key)
                if self._reader is None or self._reader.done():
                    self._reader = asyncio.ensure_future(self._read())
            await confirmed  # Redis subscribed it: what is stored from now on is published
        finally:
            if self._confirmed.get(key) is confirmed:
                del self._confirmed[key]

    def _read_soon(self, key: bytes, late: bool = False) -> None:
        """Have the stored value of `key` read (with every other read asked for meanwhile, in
        one MGET on the one read connection)."""
        self._to_read.add(key)
        if late:
            self._late.add(key)
        self._reads_wanted.set()
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.ensure_future(self._fetch())

    async def _fetch(self) -> None:
        """The reads asked for, together; it ends once nothing is waited for (a new wait starts
        it again)."""
        while self._to_read or self._waiting:
            if not self._to_read:
                self._reads_wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reads_wanted.wait(), RECHECK_S)
                continue
            keys, late = list(self._to_read), self._late
            self._to_read, self._late = set(), set()
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                try:
                    values = await self.redis.mget(chunk)
                except (redis.RedisError, OSError):
                    await asyncio.sleep(0.2)  # the re-read each second tries again
                    continue
                for key, raw in zip(chunk, values, strict=True):
                    if self._offer(key, raw) and key in late:
                        self.found_late += 1

    async def _unsubscribe(self, key: bytes) -> None:
        async with self._lock:
            if key in self._waiting:  # waited for again meanwhile
                return
            with contextlib.suppress(redis.RedisError, OSError):  # a lost connection drops it
                await self._pubsub.unsubscribe(key)

    def _offer(self, key: bytes, raw: bytes | str | None) -> bool:
        """A stored or published value of `key`: a ready one ends its waits (True if any)."""
        waiters = self._waiting.get(key)
        if raw is None or not waiters:
            return False
        try:
            meta = self.backend.decode_result(raw)
        except Exception as exc:  # not a result this app can read: its waits time out
            logger.warning("Could not read the result stored at %r: %s", key, exc)
            return False
        if meta.get("status") not in states.READY_STATES:
            return False
        ended = False
        for future in waiters:
            if not future.done():
                future.set_result(meta)
                ended = True
        return ended

    async def _read(self) -> None:
        """Dispatch what Redis publishes; each second, re-read the waits older than that (a
        message lost while the connection was re-made is found that way)."""
        checked = time.monotonic()
        while self._waiting or self._confirmed:
            try:
                message = await self._pubsub.get_message(timeout=RECHECK_S)
            except (redis.RedisError, OSError):
                await asyncio.sleep(0.2)  # reconnects (and resubscribes) on the next read
                message = None
            if time.monotonic() - checked >= RECHECK_S:
                checked = time.monotonic()
                self._recheck()
            if message is None:
                continue
            channel = message.get("channel")
            key = channel if isinstance(channel, bytes) else str(channel).encode()
            if message["type"] == "subscribe":
                confirmed = self._confirmed.pop(key, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message":
                self._offer(key, message["data"])

    def _recheck(self) -> None:
        now = time.monotonic()
        for key, since in self._since.items():
            if now - since >= RECHECK_S:
                self._read_soon(key, late=True)


# One AsyncWaiter per (event loop, backend) in this process; a forked child starts afresh. A
# plain dict: a waiter holds its loop (its tasks, lock and connections do), so a weak key would
# never be let go; closed loops are dropped by `waiter_for` instead.
_waiters: dict[asyncio.AbstractEventLoop, dict[int, AsyncWaiter]] = {}


def waiter_for(backend: Any) -> AsyncWaiter:
    """The running loop's waiter for `backend` (made on first use). Waiters of loops that
    have closed since (each `asyncio.run` makes a loop) are let go."""
    for closed in [loop for loop in _waiters if loop.is_closed()]:
        del _waiters[closed]
    of_loop = _waiters.setdefault(asyncio.get_running_loop(), {})
    waiter = of_loop.get(id(backend))
    if waiter is None or waiter.backend is not backend:
        waiter = of_loop[id(backend)] = AsyncWaiter(backend)
    return waiter


async def wait_async(result: ResultBase, timeout: float | None = None) -> Any:
    """Await a Celery result (an AsyncResult of a job, a chain, a pipeline or a batch's chord,
    or a GroupResult: the list of its values) without blocking the loop. Returns what `.get()`
    returns and raises what it raises; a timeout raises TimeoutError naming the task id."""
    if isinstance(result, GroupResult):
        deadline = None if timeout is None else time.monotonic() + timeout
        return list(
            await asyncio.gather(
                *(
                    wait_async(child, None if deadline is None else deadline - time.monotonic())
                    for child in result.results or []
                )
            )
        )
    if not isinstance(result, AsyncResult):
        raise TypeError(f"wait_async takes a Celery AsyncResult or GroupResult, not {result!r}")
    backend = result.backend
    meta = await waiter_for(backend).meta(result.id, timeout)
    return _value(backend, meta)


# --- sending from asyncio ---------------------------------------------------------------------
_publishers: list[concurrent.futures.ThreadPoolExecutor] = []


async def off_loop(step: Callable[[], T]) -> T:
    """Run a blocking step (validating and publishing a job: about half a millisecond of Python
    and a Redis round trip) in this process's one publishing thread. Three hundred requests
    arriving together would otherwise hold the loop for the whole of their sends."""
    with _thread_lock:
        if not _publishers:
            _publishers.append(
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="enhance-publish")
            )
        pool = _publishers[0]
    return await asyncio.get_running_loop().run_in_executor(pool, step)


# --- from threads ---------------------------------------------------------------------------
_thread_loop: list[asyncio.AbstractEventLoop] = []
_thread_lock = threading.Lock()


def _stop_waiting_loop() -> None:
    """At exit: end the waiting loop's tasks (their waits), so that none is left pending."""
    if not _thread_loop:
        return
    loop = _thread_loop[0]

    async def end_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(end_all(), loop).result(timeout=2)
        loop.call_soon_threadsafe(loop.stop)


def _loop() -> asyncio.AbstractEventLoop:
    """This process's waiting loop, in a daemon thread of its own (started on first use)."""
    with _thread_lock:
        if not _thread_loop:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="enhance-result-waiter", daemon=True
            )
            thread.start()
            _thread_loop.append(loop)
            atexit.register(_stop_waiting_loop)
        return _thread_loop[0]


def _forget_the_parents() -> None:
    """In a forked child: the parent's loops, threads and connections are not this process's."""
    _waiters.clear()
    _thread_loop.clear()
    _publishers.clear()


os.register_at_fork(after_in_child=_forget_the_parents)


def run_in_waiting_loop(coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
    future = asyncio.run_coroutine_threadsafe(coroutine, _loop())
    # The coroutine has its own timeout; this one only keeps a stuck loop from hanging forever.
    return future.result(None if timeout is None else timeout + 30)


def wait(result: ResultBase, timeout: float | None = None) -> Any:
    """Wait for a Celery result from a thread: `.get()`'s value and errors, seen within
    milliseconds of being stored however many other results this process has pending."""
    return run_in_waiting_loop(wait_async(result, timeout), timeout)
