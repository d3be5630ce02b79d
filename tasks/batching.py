"""Several tasks in one Runware request: the calls that this process's threads make at about the
same time share one HTTP round trip (Runware's body is an array of tasks).

A request is held open only while another call is really on its way: a job counts from the
moment the worker's consumer receives it (`expect`), through its thread's call path
(`on_the_way`, its ledger and limiter round trips), until it reaches `call` (or leaves the path
without a call). The first task of a request waits while any call is on its way, at most
RUNWARE_BATCH_WINDOW_MS, and the request leaves as soon as the last of them has arrived or it
holds RUNWARE_BATCH_MAX tasks. A lone or serial request, with nothing on its way, leaves at
once: it never pays the window.

Under load (other calls out as a call arrives, and calls arriving more than two a window) the
first task also waits a little for calls not on their way yet: about eight arrivals' time,
within the window. That is where the throughput gain of sharing requests comes from; a serial
client's call never finds another out, so it never waits for it.

Either hold is also kept within a quarter of what this task type's requests recently took
(HOLD_SHARE): sharing a request is worth a short wait against a call of a second, not against
one of a few milliseconds, where the wait would be most of the job's latency (a burst of jobs
against a fast API then goes at once, each in a request of its own, as a plain worker's would).

Each task keeps everything that is its own: its slot, its ledger entry, its result and its
error (a task's error in a batch belongs to that task only).

One open batch per task type, so a quick promptEnhance never waits for a slow image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")

# A job received but not started within this is not waited for (it was revoked, or no thread
# took it): at most this long, a request holds open for such a job.
RECEIVED_FOR_S = 0.5
# How quickly the arrival-rate and request-time estimates follow a change (the newest's weight).
_EWMA = 0.2
# The longest a request is held open, as a share of what its task type's requests recently took.
HOLD_SHARE = 0.25


@dataclass
class _Batch(Generic[R]):
    tasks: list[dict[str, object]] = field(default_factory=list)
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None


class Coalescer(Generic[R]):
    """Groups concurrent calls into one `send(tasks)` and hands its result to every caller."""

    def __init__(
        self,
        send: Callable[[list[dict[str, object]]], R],
        max_size: int,
        window_s: float,
        interrupted: Callable[[], BaseException] = lambda: RuntimeError(
            "the request this task joined was never sent (its first task was interrupted)"
        ),
    ) -> None:
        self._send = send
        self.interrupted = interrupted
        self.max_size = max(1, max_size)
        self.window_s = max(0.0, window_s)
        self._cond = threading.Condition()
        self._open: dict[str, _Batch[R]] = {}
        self._coming = 0  # threads in the call path that have not reached `call` yet
        self._mine = threading.local()  # this thread's own announcement, not yet arrived
        self._received: dict[str, float] = {}  # jobs received, not started: token -> when
        self._sending = 0  # tasks in requests sent and not answered yet
        self._last: dict[str, float] = {}  # the latest arrival, per task type
        self._gap: dict[str, float] = {}  # the mean time between arrivals, per task type
        self._took: dict[str, float] = {}  # the mean time a request took, per task type

    def expect(self, token: str) -> None:
        """This process received a job that will start in a moment (the worker's consumer
        hands it to a free thread): an open request waits for it too, for RECEIVED_FOR_S at
        most (a job revoked before it starts never comes)."""
        with self._cond:
            self._received[token] = time.monotonic()
            if len(self._received) > 10_000:
                self._forget_stale()

    @contextmanager
    def on_the_way(self, token: str | None = None) -> Iterator[None]:
        """Around a job's call path: while the thread is in it and has not reached `call`, an
        open request waits for it (within the window). Leaving without a call ends the wait.
        `token`: the one given to `expect` when the job was received."""
        if getattr(self._mine, "coming", False):  # already counted by an outer call path
            yield
            return
        with self._cond:
            if token is not None:
                self._received.pop(token, None)
            self._coming += 1
        self._mine.coming = True
        try:
            yield
        finally:
            if getattr(self._mine, "coming", False):
                self._mine.coming = False
                with self._cond:
                    self._coming -= 1
                    self._cond.notify_all()

    @property
    def coming(self) -> int:
        """How many calls are on their way: jobs received or started, not at `call` yet."""
        with self._cond:
            self._forget_stale()
            return self._coming + len(self._received)

    def _forget_stale(self) -> None:
        """Drop received jobs that did not start within RECEIVED_FOR_S (the lock held)."""
        if self._received:
            cutoff = time.monotonic() - RECEIVED_FOR_S
            for token in [t for t, at in self._received.items() if at < cutoff]:
                del self._received[token]

    def _others_coming(self) -> bool:
        """Whether any call is on its way (the lock held)."""
        if self._coming > 0:
            return True
        self._forget_stale()
        return bool(self._received)

    def call(self, kind: str, task: dict[str, object], alone: bool = False) -> R:
        """Send `task` (alone or with others of its `kind`) and return the request's result,
        which `send` makes for the whole request (it reports transport errors in it, not by
        raising: an exception from `send` is a bug and is raised in every caller).

        `alone`: in a request of its own, but held as a shared one would be (while other
        calls are on their way, within the window), so that requests leave no closer together
        than the slots they hold were granted."""
        if self.max_size == 1:
            self._arrived_unlocked()
            return self._send([task])
        with self._cond:
            self._arrive()
            longest = self._longest_hold(kind)
            hold = min(longest, self._speculative_hold(kind))
            key = f"{kind}/alone/{id(task)}" if alone else kind
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch()
            batch.tasks.append(task)
            self._cond.notify_all()  # a waiting first task counts who is still on the way
            try:
                if len(batch.tasks) >= self.max_size:
                    self._close(key, batch)
                elif leader:
                    # Others are on their way (or, under load, sure to come): hold the request
                    # open for them, no longer.
                    now = time.monotonic()
                    deadline, sure = now + longest, now + hold
                    while (
                        not batch.closed
                        and ((now := time.monotonic()) < sure or self._others_coming())
                        and (remaining := deadline - now) > 0
                    ):
                        self._cond.wait(
                            min(remaining, sure - now if now < sure else RECEIVED_FOR_S)
                        )
            except BaseException:
                # The leader was interrupted (a time limit, a terminated job) before sending:
                # the request goes unsent, and the tasks that joined it are told to go again.
                if leader:
                    self._close(key, batch)
                    batch.error = self.interrupted()
                    batch.done.set()
                raise
            finally:  # the leader closes its batch, then sends it
                if leader:
                    self._close(key, batch)
        if not leader:
            batch.done.wait()
        else:
            with self._cond:
                self._sending += len(batch.tasks)
            began = time.monotonic()
            try:
                batch.result = self._send(batch.tasks)
            except BaseException as exc:  # every task of the request sees the same failure
                batch.error = exc
            finally:
                with self._cond:
                    self._sending -= len(batch.tasks)
                    self._took_for(kind, time.monotonic() - began)
                batch.done.set()
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result

    def _close(self, kind: str, batch: _Batch[R]) -> None:
        batch.closed = True
        if self._open.get(kind) is batch:
            del self._open[kind]
        self._cond.notify_all()

    def _took_for(self, kind: str, seconds: float) -> None:
        """A request of `kind` took `seconds` (the lock held)."""
        mean = self._took.get(kind, seconds)
        self._took[kind] = (1 - _EWMA) * mean + _EWMA * seconds

    def _longest_hold(self, kind: str) -> float:
        """The longest a request of `kind` may be held open (the lock held): the window, within
        HOLD_SHARE of what its requests recently took (the window until one has been sent)."""
        took = self._took.get(kind)
        return self.window_s if took is None else min(self.window_s, HOLD_SHARE * took)

    def _speculative_hold(self, kind: str) -> float:
        """How long to hold a request open for calls not on their way yet (the lock held):
        under load only, that is when other calls were out as this one arrived and at least
        two more are expected within the window (judged from the arrival rate of its task
        type), for about eight arrivals' time. A serial client's call never finds another
        out, so it is never held for calls that cannot come."""
        now = time.monotonic()
        last = self._last.get(kind)
        self._last[kind] = now
        if last is None:
            return 0.0
        mean = self._gap.get(kind, now - last)
        mean = self._gap[kind] = (1 - _EWMA) * mean + _EWMA * (now - last)
        if self._sending > 0 and mean < self.window_s / 2:
            return min(self.window_s, 8 * mean)
        return 0.0

    def _arrive(self) -> None:
        """This thread reached `call` (the lock held): it is no longer on its way."""
        if getattr(self._mine, "coming", False):
            self._mine.coming = False
            self._coming -= 1

    def arrived(self) -> None:
        """This thread's call goes out without a shared request (a task type that is never
        batched): no request waits for it any more."""
        self._arrived_unlocked()

    def _arrived_unlocked(self) -> None:
        if getattr(self._mine, "coming", False):
            with self._cond:
                self._arrive()
                self._cond.notify_all()
