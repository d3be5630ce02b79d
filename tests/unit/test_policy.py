"""The retry policy and the fate of a call's reservation, without Redis or a worker: the rules
of tasks/policy.py, tasks/reservation.py's owner of a reservation, and RunwareTask's call path
with collaborators handed to it (fakes that record what they were asked). The same promises are
kept end to end by tests/integration/test_errors_and_retries.py and test_money.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Ignore, Retry

from config.settings import get_settings
from tasks.base import Collaborators, RunwareJob, RunwareTask
from tasks.errors import (
    BUDGET_UNSETTLED,
    AuthenticationError,
    PermanentError,
    TaskTimeout,
    TransientError,
)
from tasks.ledger import Started
from tasks.policy import GiveUp, RetryIn, RetryPolicy, WaitForBudget, reservation_fate
from tasks.reservation import ReservedCall
from tasks.runware import TaskOutcome

POLICY = RetryPolicy(
    limit=3,
    backoff_s=1.0,
    backoff_max_s=30.0,
    retry_after_max_s=300.0,
    budget_wait_max_s=600.0,
    reconcile_s=60.0,
)
HIGHEST = max  # a `uniform` that always draws the top of its range


def test_a_transient_failure_retries_after_a_capped_exponential_back_off() -> None:
    exc = TransientError("HTTP 500", code="serverError")
    for retries, ceiling in ((0, 1.0), (1, 2.0), (2, 4.0)):
        decision = POLICY.after(exc, retries, None, now=1000.0, uniform=HIGHEST)
        assert decision == RetryIn(countdown=ceiling, attempt=retries + 1, limit=3)
    wide = RetryPolicy(10, 1.0, 30.0, 300.0, 600.0, 60.0)
    assert wide.after(exc, 9, None, 0.0, uniform=HIGHEST) == RetryIn(30.0, 10, 10)  # capped
    low = POLICY.after(exc, 2, None, 0.0, uniform=min)
    assert isinstance(low, RetryIn)
    assert low.countdown == 0.0  # full jitter: anywhere from 0


def test_a_retry_waits_at_least_retry_after_itself_capped() -> None:
    throttled = TransientError("HTTP 503", code="serviceUnavailable", retry_after=45.0)
    decision = POLICY.after(throttled, 0, None, 0.0, uniform=HIGHEST)
    assert isinstance(decision, RetryIn)
    assert decision.countdown == 45.0
    forever = TransientError("HTTP 503", retry_after=36_000.0)
    capped = POLICY.after(forever, 0, None, 0.0, uniform=HIGHEST)
    assert isinstance(capped, RetryIn)
    assert capped.countdown == 300.0


def test_the_last_attempt_gives_up_with_the_retry_count() -> None:
    exc = TransientError("no answer", code="timeout", status=None)
    assert isinstance(POLICY.after(exc, 2, None, 0.0), RetryIn)
    decision = POLICY.after(exc, 3, None, 0.0)
    assert isinstance(decision, GiveUp)
    assert str(decision.error) == "no answer (gave up after 3 retries)"
    assert decision.error.code == "timeout"
    assert POLICY.last_attempt(3)
    assert not POLICY.last_attempt(2)


def test_a_budget_refusal_waits_for_reconciliation_with_its_retries_untouched() -> None:
    unsettled = TransientError("budget", code=BUDGET_UNSETTLED, retry_after=20.0)
    first = POLICY.after(unsettled, 3, None, now=1000.0)  # even on what would be the last try
    assert isinstance(first, WaitForBudget)
    assert (first.countdown, first.since) == (20.0, 1000.0)
    nearly = POLICY.after(unsettled, 3, 1000.0, now=1590.0)
    assert isinstance(nearly, WaitForBudget)
    assert nearly.countdown == pytest.approx(10.0)  # no later than the wait's end
    over = POLICY.after(unsettled, 3, 1000.0, now=1601.0)
    assert isinstance(over, GiveUp)  # the wait is over: the usual rule


def test_a_tasks_own_options_win_over_the_settings() -> None:
    class Own:
        retry_limit = 1
        retry_backoff_s = 0.5
        retry_backoff_max_s = None

    settings = get_settings()
    policy = RetryPolicy.of(Own(), settings)
    assert (policy.limit, policy.backoff_s) == (1, 0.5)
    assert policy.backoff_max_s == settings.runware_retry_backoff_max_s


@pytest.mark.parametrize(
    ("exc", "submitted", "last", "fate"),
    [
        (Ignore(), False, True, "keep"),
        (Retry(), False, True, "keep"),
        (TransientError("x"), True, False, "keep"),
        (TransientError("x"), True, True, "give up"),
        (AuthenticationError("key"), False, False, "release"),
        (AuthenticationError("key"), True, False, "keep"),
        (PermanentError("bad"), True, False, "release"),
        (TaskTimeout("late"), True, False, "give up"),
        (RuntimeError("bug"), False, False, "give up"),
    ],
)
def test_the_fate_of_a_reservation(
    exc: BaseException, submitted: bool, last: bool, fate: str
) -> None:
    assert reservation_fate(exc, submitted, last) == fate


@dataclass
class FakeLedger:
    started: Started = field(default_factory=lambda: Started())
    asked: list[tuple[str, ...]] = field(default_factory=list)

    def begin(self, task_uuid: str, account: str, estimate_usd: float, shape: str) -> Started:
        self.asked.append(("begin", task_uuid))
        return self.started

    def end(
        self, task_uuid: str, account: str, cost: float, items: list[dict[str, Any]], shape: str
    ) -> None:
        self.asked.append(("end", task_uuid, f"{cost:.4f}"))

    def release(self, task_uuid: str) -> None:
        self.asked.append(("release", task_uuid))

    def give_up(self, task_uuid: str) -> None:
        self.asked.append(("give up", task_uuid))


def _reserved(ledger: FakeLedger, last: bool = False) -> ReservedCall:
    return ReservedCall(ledger, "u1", "acme", 0.0013, "promptEnhance m", last_attempt=last)


def test_a_reserved_call_records_its_cost_once_it_finishes() -> None:
    ledger = FakeLedger()
    with _reserved(ledger) as reserved:
        reserved.finish(0.0026, [{"text": "a"}, {"text": "b"}])
    assert ledger.asked == [("begin", "u1"), ("end", "u1", "0.0026")]


@pytest.mark.parametrize(
    ("exc", "last", "then"),
    [
        (PermanentError("bad"), False, [("release", "u1")]),
        (TransientError("x"), False, []),
        (TransientError("x"), True, [("give up", "u1")]),
        (RuntimeError("bug"), False, [("give up", "u1")]),
    ],
)
def test_a_reserved_call_ends_as_its_exception_says(
    exc: Exception, last: bool, then: list[tuple[str, ...]]
) -> None:
    ledger = FakeLedger()
    with pytest.raises(type(exc)), _reserved(ledger, last):
        raise exc
    assert ledger.asked == [("begin", "u1"), *then]


# --- RunwareTask's call path with collaborators handed to it --------------------------------
@dataclass
class FakeClient:
    answer: TaskOutcome | Exception

    def run(self, body: dict[str, Any], alone: bool = False) -> TaskOutcome:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class FakeLimiter:
    def refused(self) -> bool:
        return False

    def heard(self, call: Any) -> Any:
        return call()


@dataclass
class FakePending:
    alone: list[str] = field(default_factory=list)

    def send_alone(self, task_uuid: str) -> None:
        self.alone.append(task_uuid)


def _task(answer: TaskOutcome | Exception, ledger: FakeLedger) -> tuple[RunwareTask, FakePending]:
    app = Celery("policy-test", set_as_current=False)

    # (shared=False: a shared task would join every Celery app made later in this process)
    @app.task(bind=True, base=RunwareTask, name="tests.policy_call", retry_limit=2, shared=False)
    def call(self: RunwareTask, **_: Any) -> None:  # (the body is not run here)
        return None

    pending = FakePending()
    fakes: Any = (get_settings(), ledger, FakeLimiter(), FakeClient(answer), pending, None, None)
    call.use(Collaborators(*fakes))
    return call, pending


JOB = RunwareJob(
    body={"taskType": "promptEnhance", "taskUUID": "u1", "model": "m", "prompt": "a fox"},
    account="acme",
    estimate_usd=0.0013,
    deliver_async=False,
    timeout_s=30.0,
)


def test_a_call_that_succeeds_records_its_cost() -> None:
    ledger = FakeLedger()
    outcome = TaskOutcome("u1", [{"text": "a fox, lit", "cost": 0.0013}])
    task, _pending = _task(outcome, ledger)
    task.push_request(id="job-1", retries=0, kwargs={})
    try:
        assert task.call_runware(JOB) == outcome
    finally:
        task.pop_request()
    assert ledger.asked == [("begin", "u1"), ("end", "u1", "0.0013")]


@pytest.mark.parametrize(
    ("error", "retries", "then"),
    [
        (PermanentError("Runware refused it"), 0, [("release", "u1")]),
        (TransientError("no answer", code="timeout"), 0, []),
        (TransientError("no answer", code="timeout"), 2, [("give up", "u1")]),
        (TransientError("shared", code="batchUnattributed"), 0, []),
    ],
)
def test_a_call_that_fails_leaves_its_reservation_as_the_policy_says(
    error: Exception, retries: int, then: list[tuple[str, ...]]
) -> None:
    ledger = FakeLedger()
    task, pending = _task(error, ledger)
    task.push_request(id="job-1", retries=retries, kwargs={})
    try:
        with pytest.raises(type(error)):
            task.call_runware(JOB)
    finally:
        task.pop_request()
    assert ledger.asked == [("begin", "u1"), *then]
    assert pending.alone == (["u1"] if getattr(error, "code", "") == "batchUnattributed" else [])


def test_a_finished_call_comes_back_without_a_call() -> None:
    ledger = FakeLedger(started=Started(finished=[{"text": "done", "cost": 0.0013}]))
    task, _pending = _task(RuntimeError("no call may be made"), ledger)
    task.push_request(id="job-1", retries=0, kwargs={})
    try:
        outcome = task.call_runware(JOB)
    finally:
        task.pop_request()
    assert outcome.items == [{"text": "done", "cost": 0.0013}]
    assert ledger.asked == [("begin", "u1")]
