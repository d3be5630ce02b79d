"""Reconciliation: the calls whose outcome no job recorded get their real cost from Runware.

A call is *unsettled* when Runware may have accepted (and billed) it but its job stopped following
it: the worker was killed, the task timed out, or its retries ran out (tasks/ledger.py). Every
RUNWARE_RECONCILE_S each worker process claims the due ones (an atomic claim: no two processes
take the same, and none is claimed again while its check waits or runs) and enqueues one
`tasks.reconcile_call` job for each. That job is a Runware call like any other: it waits for
a grant under the fleet's limits (priority batch), then asks Runware with getResponse:
- finished: its real cost goes into the ledger once, on the day the call started, and its items
  are kept, so a job delivered again returns them without a call;
- unknown to Runware, or ended in error there: never billed, the reservation is dropped;
- still running: checked again next period (and dropped, with a warning, if Runware still has
  not finished it a day after the call started).
`enhance-worker reconcile` enqueues the same jobs now and waits for them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

from config.celery import app
from config.keys import FairKeys
from config.settings import Settings, get_settings
from enhance_client.schemas import check_account, check_priority
from tasks.base import RunwareTask
from tasks.dispatcher import live_workers
from tasks.errors import AuthenticationError, PermanentError, TransientError, ValidationError
from tasks.ledger import DAY_S, Ledger, Reservation, get_ledger
from tasks.limiter import broker_redis, get_limiter
from tasks.runware import get_client

logger = logging.getLogger(__name__)

CLAIM_MAX = 500  # reservations claimed per period and process
ACCOUNT_STATUSES = (402, 403)  # refusals about the account, which say nothing of the call
# A call Runware still reports unfinished this long after it started is not waited for longer.
GIVE_UP_S = DAY_S


@app.task(bind=True, base=RunwareTask, name="tasks.reconcile_call")
def reconcile_call(
    self: RunwareTask,
    *,
    taskUUID: str,  # Runware's field name, as in every task
    account: str = "default",
    priority: str = "batch",
    claimed: float | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Settle one unsettled call: ask Runware for its outcome with getResponse and record its
    real cost once, or drop its reservation. Returns `{"taskUUID", "state", "cost"}` where state
    is `settled`, `released`, `running` or `unknown` (Runware could not be asked; next period).
    An `account` or `priority` the dispatcher would not grant (the same rule) fails at once."""
    try:
        account = check_account(account)
        check_priority(priority)
    except ValueError as exc:
        raise ValidationError(f"invalid reconcile_call request: {exc}") from None
    ledger = get_ledger()
    try:
        return _check(ledger, taskUUID, account, claimed, started)
    finally:
        ledger.checked(taskUUID)


def _check(
    ledger: Ledger, taskUUID: str, account: str, claimed: float | None, started: float | None
) -> dict[str, Any]:
    try:
        done, outcome = get_limiter().heard(lambda: get_client().get_response(taskUUID))
    except PermanentError as exc:
        if isinstance(exc, AuthenticationError) or exc.status in ACCOUNT_STATUSES:
            # About our key or account, not the call: Runware could not be asked.
            logger.warning("Unsettled call %s could not be checked (%s).", taskUUID, exc)
            return {"taskUUID": taskUUID, "state": "unknown", "cost": None, "reason": str(exc)}
        # Runware does not have it, or it failed there: not billed.
        if not ledger.release(taskUUID, claimed):  # its job took it up again meanwhile
            return {"taskUUID": taskUUID, "state": "running", "cost": None}
        logger.info("Unsettled call %s was not billed (%s); reservation dropped.", taskUUID, exc)
        return {"taskUUID": taskUUID, "state": "released", "cost": 0.0, "reason": str(exc)}
    except TransientError as exc:
        logger.warning("Unsettled call %s could not be checked (%s); next period.", taskUUID, exc)
        return {"taskUUID": taskUUID, "state": "unknown", "cost": None, "reason": str(exc)}
    if done:
        recorded = ledger.end(taskUUID, account, outcome.cost, outcome.items)
        logger.info(
            "Unsettled call %s settled: cost=$%.6f (recorded now: %s).",
            taskUUID,
            outcome.cost,
            recorded,
        )
        return {"taskUUID": taskUUID, "state": "settled", "cost": outcome.cost}
    # (Both by Redis's clock: the reservation's start, and the claim.)
    if started is not None and claimed is not None and claimed - started > GIVE_UP_S:
        ledger.release(taskUUID, claimed)
        logger.warning(
            "Runware still reports call %s unfinished %.0f h after it started; its reservation "
            "is dropped.",
            taskUUID,
            (claimed - started) / 3600,
        )
        return {"taskUUID": taskUUID, "state": "released", "cost": 0.0}
    return {"taskUUID": taskUUID, "state": "running", "cost": None}


def enqueue_due(ledger: Ledger, settings: Settings, priority: str = "batch") -> list[AsyncResult]:  # type: ignore[type-arg]
    """Claim every due reservation (up to CLAIM_MAX), and every one held by a worker process
    that stopped heartbeating, and enqueue its check."""
    try:
        alive: list[str] | None = live_workers(
            broker_redis(settings), FairKeys(settings.key_prefix)
        )
    except redis.RedisError:  # not known now: those wait for RUNWARE_RESERVATION_S
        alive = None
    # A check waits for a slot like any call; one that has not reported within the time a job
    # may take to come back is taken for lost, and queued again.
    due: list[Reservation] = ledger.claim_due(settings.runware_reservation_s, CLAIM_MAX, alive)
    return [
        reconcile_call.apply_async(
            kwargs={
                "taskUUID": r.task_uuid,
                "account": r.account,
                "priority": priority,
                "claimed": r.due,
                "started": r.started,
            }
        )
        for r in due
    ]


@dataclass
class Summary:
    """What `enhance-worker reconcile` found."""

    checked: int = 0
    settled: int = 0
    settled_usd: float = 0.0
    released: int = 0
    running: int = 0
    unknown: int = 0
    waiting: int = 0  # no worker answered in time: the jobs stay queued

    def add(self, result: dict[str, Any]) -> None:
        self.checked += 1
        state = result.get("state")
        if state == "settled":
            self.settled += 1
            self.settled_usd += float(result.get("cost") or 0.0)
        elif state == "released":
            self.released += 1
        elif state == "running":
            self.running += 1
        else:
            self.unknown += 1


def reconcile_now(timeout_s: float) -> Summary:
    """Enqueue the check of every due reservation (interactive priority) and wait for them."""
    settings = get_settings()
    results = enqueue_due(get_ledger(), settings, priority="interactive")
    summary = Summary()
    deadline = time.monotonic() + timeout_s
    for result in results:
        try:
            summary.add(result.get(timeout=max(0.1, deadline - time.monotonic())))
        except ResultTimeout:
            summary.waiting += 1
        finally:
            result.forget()
    return summary


class Reconciler(threading.Thread):
    """Every RUNWARE_RECONCILE_S (with jitter), this process enqueues the checks of the due
    reservations."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.settings = settings
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        period = self.settings.runware_reconcile_s
        while not self._stopped.wait(period * random.uniform(0.75, 1.0)):
            try:
                results = enqueue_due(get_ledger(), self.settings)
            except Exception as exc:  # a bad period must not end the thread
                logger.warning("Could not claim unsettled calls: %s", exc)
                continue
            if results:
                logger.info("Enqueued the check of %d unsettled calls.", len(results))
