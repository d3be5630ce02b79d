"""Several tasks in one Runware request: the calls that this process's threads make at about the
same time share one HTTP round trip (Runware's body is an array of tasks).

A request leaves when it holds RUNWARE_BATCH_MAX tasks, or RUNWARE_BATCH_WINDOW_MS after its
first task arrived; but when this process is not busy (fewer than one other call expected within
the window, judged from the recent arrival rate) it leaves at once, so a lone job waits for
nothing. Each task keeps everything that is its own: its slot, its ledger entry, its
result and its error (a task's error in a batch belongs to that task only).

One open batch per task type, so a quick promptEnhance never waits for a slow image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")

# How quickly the arrival-rate estimate follows a change of load (weight of the newest gap).
_EWMA = 0.2


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
        self._last: dict[str, float] = {}
        self._gap: dict[str, float] = {}  # mean seconds between arrivals, per task type

    def call(self, kind: str, task: dict[str, object], alone: bool = False) -> R:
        """Send `task` (alone or with others of its `kind`) and return the request's result,
        which `send` makes for the whole request (it reports transport errors in it, not by
        raising: an exception from `send` is a bug and is raised in every caller).

        `alone`: in a request of its own, but sent when a shared one would be (after the
        window when the process is busy), so that requests leave no closer together than the
        slots they hold were granted."""
        if self.max_size == 1:
            return self._send([task])
        now = time.monotonic()
        with self._cond:
            busy = self._note_arrival(kind, now)
            key = f"{kind}/alone/{id(task)}" if alone else kind
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch()
            batch.tasks.append(task)
            try:
                if len(batch.tasks) >= self.max_size:
                    self._close(key, batch)
                elif leader and busy:
                    # Others are likely on their way: hold the request open for them.
                    deadline = now + self.window_s
                    while not batch.closed and (remaining := deadline - time.monotonic()) > 0:
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

    def _note_arrival(self, kind: str, now: float) -> bool:
        """Update the arrival-rate estimate; True when another call is expected in the window."""
        last = self._last.get(kind)
        self._last[kind] = now
        if last is None:
            return False
        gap = now - last
        mean = self._gap.get(kind, gap)
        mean = self._gap[kind] = (1 - _EWMA) * mean + _EWMA * gap
        return mean < self.window_s
