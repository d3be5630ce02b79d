"""One call's budget reservation, from its start to its fate, in one place.

    with ReservedCall(ledger, job, shape, last_attempt) as reserved:
        if reserved.started.finished is not None: ...  # its items, no call
        outcome = ...the call...
    reserved.finish(outcome.cost, outcome.items)        # the real cost, recorded once

Entering reserves the estimate under the budgets (or finds the call finished); `finish` records
the real cost. Leaving with an exception decides the reservation's fate by that exception
(tasks/policy.py's `reservation_fate`): kept for the job's next run, released (nothing was
billed), or given up to the reconciler (Runware may have billed it).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol

from tasks.ledger import Started
from tasks.policy import reservation_fate


class Ledger(Protocol):
    """What a reserved call needs of tasks/ledger.py's Ledger."""

    def begin(self, task_uuid: str, account: str, estimate_usd: float, shape: str) -> Started: ...

    def end(
        self, task_uuid: str, account: str, cost: float, items: list[dict[str, Any]], shape: str
    ) -> Any: ...

    def release(self, task_uuid: str) -> Any: ...

    def give_up(self, task_uuid: str) -> None: ...


class ReservedCall:
    """A context manager owning one call's reservation (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        task_uuid: str,
        account: str,
        estimate_usd: float,
        shape: str,
        last_attempt: bool,
    ) -> None:
        self.ledger = ledger
        self.task_uuid = task_uuid
        self.account = account
        self.estimate_usd = estimate_usd
        self.shape = shape
        self.last_attempt = last_attempt
        self._started: Started | None = None
        self._finished = False

    @property
    def started(self) -> Started:
        assert self._started is not None, "enter the ReservedCall first"
        return self._started

    def __enter__(self) -> ReservedCall:
        self._started = self.ledger.begin(
            self.task_uuid, self.account, self.estimate_usd, self.shape
        )
        return self

    def finish(self, cost: float, items: list[dict[str, Any]]) -> None:
        """The call finished: record its real cost (once per taskUUID) with its items. Called
        inside the `with` or after it (then a failure to record keeps the reservation)."""
        self.ledger.end(self.task_uuid, self.account, cost, items, self.shape)
        self._finished = True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None or self._finished or self._started is None:
            return
        fate = reservation_fate(exc, self._started.submitted is not None, self.last_attempt)
        if fate == "release":
            self.ledger.release(self.task_uuid)
        elif fate == "give up":
            self.ledger.give_up(self.task_uuid)
