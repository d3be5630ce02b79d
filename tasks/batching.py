"""Several tasks in one Runware request: the calls that this process's threads make at about the
same time share one HTTP round trip (Runware's body is an array of tasks).

A request is held open only while another call is really on its way: a job's thread announces
itself as it enters the call path (`on_the_way`, before its ledger and limiter round trips) and
counts as arrived when it reaches `call` (or leaves the path without a call). The first task of
a request waits while any call is on its way, at most RUNWARE_BATCH_WINDOW_MS, and the request
leaves as soon as the last of them has arrived or it holds RUNWARE_BATCH_MAX tasks. A lone or
serial request, with nothing on its way, leaves at once: it never pays the window. Each task
keeps everything that is its own: its slot, its ledger entry, its result and its error (a
task's error in a batch belongs to that task only).

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
        self, send: Callable[[list[dict[str, object]]], R], max_size: int, window_s: float
    ) -> None:
        self._send = send
        self.max_size = max(1, max_size)
        self.window_s = max(0.0, window_s)
        self._cond = threading.Condition()
        self._open: dict[str, _Batch[R]] = {}
        self._coming = 0  # threads in the call path that have not reached `call` yet
        self._mine = threading.local()  # this thread's own announcement, not yet arrived

    @contextmanager
    def on_the_way(self) -> Iterator[None]:
        """Around a job's call path: while the thread is in it and has not reached `call`, an
        open request waits for it (within the window). Leaving without a call ends the wait."""
        with self._cond:
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
        """How many calls are on their way (for tests and metrics)."""
        return self._coming

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
                    # Others are on their way: hold the request open for them, no longer.
                    deadline = time.monotonic() + self.window_s
                    while (
                        not batch.closed
                        and self._coming > 0
                        and (remaining := deadline - time.monotonic()) > 0
                    ):
                        self._cond.wait(remaining)
            finally:  # even when interrupted, the leader closes its batch and then sends it
                if leader:
                    self._close(key, batch)
        if not leader:
            batch.done.wait()
        else:
            try:
                batch.result = self._send(batch.tasks)
            except BaseException as exc:  # every task of the request sees the same failure
                batch.error = exc
            finally:
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

    def _arrive(self) -> None:
        """This thread reached `call` (the lock held): it is no longer on its way."""
        if getattr(self._mine, "coming", False):
            self._mine.coming = False
            self._coming -= 1

    def _arrived_unlocked(self) -> None:
        if getattr(self._mine, "coming", False):
            with self._cond:
                self._arrive()
                self._cond.notify_all()
