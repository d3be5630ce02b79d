"""The shared Task class: the retry policy, the budget and the call to Runware, written once.

A task is written as a body that validates its arguments, calls `call_runware` and returns its
result (a dict); it raises what went wrong and does nothing else. Celery runs every job through
`RunwareTask.__call__`, which applies the policy to the body, so a task cannot forget it:
- ValidationError, PermanentError and other WorkerErrors fail the task at once, logged once at
  ERROR with a message that says what was wrong. What is worth a retry is decided in one place,
  tasks/errors.py's `for_policy` (and `runware_error` for Runware's answers).
- TransientError retries with exponential back-off and full jitter, capped, honouring Retry-After,
  at most RUNWARE_MAX_RETRIES times (the task's `retry_limit`, `retry_backoff_s` and
  `retry_backoff_max_s` options override the settings); then the task fails with the last error
  and the retry count.
- Every job's outcome is logged once (taskUUID, duration, cost or reason) and counted in the
  metrics (tasks/metrics.py); a job that fails for good is kept as a dead letter.
- Waiting for Runware to finish an async task is not failing: the job is re-scheduled with a
  countdown (kept in Redis by the fair intake, not in a worker) and its retry budget is
  untouched. A job reaches a worker only once the fleet granted it a slot (tasks/dispatcher.py),
  and makes at most one call to Runware per run; the slot goes back when it is acknowledged.
- Every call reserves its estimated cost under the budgets first and records its real cost once;
  a call whose outcome the job could not learn is left for the reconciler (tasks/reconcile.py).
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Ignore, Retry

from config.settings import get_settings
from enhance_client.schemas import stable_task_uuid
from tasks import metrics, tracing
from tasks.deadletter import get_dead_letters
from tasks.errors import (
    BUDGET_UNSETTLED,
    AuthenticationError,
    ConflictTaskUUID,
    PermanentError,
    TaskTimeout,
    TransientError,
    ValidationError,
    WorkerError,
    for_policy,
)
from tasks.ledger import Started, call_shape, get_ledger
from tasks.limiter import Limiter, get_limiter
from tasks.messages import CONTINUES_HEADER
from tasks.polling import get_pending
from tasks.runware import UNATTRIBUTED, TaskOutcome, get_client
from tasks.webhooks import expected_items, get_inbox, is_error, webhook_url

logger = logging.getLogger(__name__)
N = TypeVar("N", int, float)
BUDGET_WAIT_HEADER = "enhance_budget_wait_since"  # when a job's first such refusal came
KEY_WAIT_S = 1.0  # a job sent back while the key is refused: due again at once, then held


def backoff_seconds(
    retries: int, base: float, cap: float, retry_after: float | None, retry_after_cap: float
) -> float:
    """Full-jitter exponential back-off: uniform(0, min(cap, base * 2**retries)), but never
    sooner than the server's Retry-After (itself bounded by `retry_after_cap`)."""
    ceiling = min(cap, base * (2 ** min(retries, 32)))
    delay = random.uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


@dataclass(frozen=True)
class RunwareJob:
    """One Runware task to run for a Celery job, and how to pay for and wait on it."""

    body: dict[str, Any]  # the task object sent to Runware (taskType, taskUUID, ...)
    account: str
    estimate_usd: float
    deliver_async: bool
    timeout_s: float  # deadline of an async task, from its submission

    @property
    def task_uuid(self) -> str:
        return str(self.body["taskUUID"])


class RunwareTask(Task):  # type: ignore[type-arg]
    """Base of every task that calls Runware: `@app.task(bind=True, base=RunwareTask, name=...)`.

    Per-task options (given to `@app.task`) change the policy for that task only."""

    # Our own errors are expected outcomes: Celery logs them without a traceback; we log them once.
    throws = (WorkerError,)
    typing = False
    # Celery's own retry cap (default 3) would cut our policy short: `retry_limit` bounds it.
    max_retries = None
    # The retry policy; None takes the setting named beside it.
    retry_limit: int | None = None  # RUNWARE_MAX_RETRIES
    retry_backoff_s: float | None = None  # RUNWARE_RETRY_BACKOFF_S
    retry_backoff_max_s: float | None = None  # RUNWARE_RETRY_BACKOFF_MAX_S
    # A job that fails for good returns {"prompt", "error"} (and is kept as a dead letter)
    # instead of failing: for the items of a batch, so that one failure does not sink its chord.
    failure_as_result = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body (`run`) under the retry policy. Celery's worker calls this with the
        job's request already pushed, so it calls `run` directly (`Task.__call__` would push
        an empty request over it)."""
        started = time.monotonic()
        try:
            # A job granted a slot is on its way to a Runware call: a request this process's
            # other threads hold open waits for it (tasks/batching.py), and for nothing else.
            with get_client().on_the_way(self.request.id):
                result = self.run(*args, **kwargs)
        except (Ignore, Retry):
            raise
        except Exception as exc:
            error = for_policy(exc)
            if error is None:  # a bug: failed with its traceback, never retried
                raise
            if isinstance(error, AuthenticationError):
                # A key problem is the fleet's, not the job's: the fleet pauses, the job waits.
                try:
                    get_limiter().refuse_key(str(error))
                except redis.RedisError as failure:  # this process stays refused all the same
                    logger.warning("Could not pause the fleet for the refused key: %s", failure)
                raise self._wait_for_a_key() from None
            if isinstance(error, TransientError):
                error = self._retry_or_give_up(error, started)  # raises Retry while it may
            else:
                self._log_outcome(logging.ERROR, "failed", started, reason=str(error))
            if self.failure_as_result:
                self.dead_letter(error, str(self.request.id), list(args), kwargs)
                return {"prompt": kwargs.get("prompt"), "error": str(error)}
            if error is exc:
                raise
            raise error from None
        if isinstance(result, dict) and "error" not in result:
            metrics.JOBS.labels(self.name, "success").inc()
            self._log_outcome(logging.INFO, "succeeded", started, cost=result.get("cost"))
        return result

    def keyword_only(self, args: tuple[Any, ...]) -> None:
        """Refuse positional arguments with a message that says how to call the task."""
        if args:
            raise ValidationError(
                f"{self.name} takes keyword arguments only (got {len(args)} positional)"
            )

    def reschedule(
        self,
        countdown: float,
        why: str,
        headers: dict[str, Any] | None = None,
        continues: bool = True,
    ) -> Ignore:
        """Send this job again in `countdown` seconds without touching its retry budget.

        The new message keeps the task id, arguments, retry count and chain links; this run ends
        without a state change. The fair intake keeps it in Redis until it is due, then it waits
        for a slot like any other job.
        """
        metrics.RESCHEDULES.labels(self.name).inc()
        tracing.event("rescheduled", reason=why, countdown_s=countdown)
        logger.info(
            "Task %s (%s) %s; re-scheduled in %.1fs.", self.request.id, self.name, why, countdown
        )
        self.signature_from_request(
            self.request,
            countdown=countdown,
            retries=self.request.retries,
            headers={**self._headers(continues=continues), **(headers or {})},
        ).apply_async()
        return Ignore(f"re-scheduled in {countdown:.1f}s")

    def _wait_for_a_key(self) -> Ignore:
        """Send this job back to wait (its retries untouched) while Runware refuses the key:
        the fleet grants nothing until it resumes."""
        return self.reschedule(
            KEY_WAIT_S,
            "waits: Runware refused the API key and the fleet is paused",
            continues=False,
        )

    def _headers(self, continues: bool) -> dict[str, Any]:
        """The message headers of this job's next run: its own custom ones, and whether it
        continues a call under way (a poll: it goes to the head of its account's queue when
        due) or starts over (a retry: it queues behind the account's waiting jobs, as a new
        job would, so that failing jobs cannot keep fresh ones from ever starting)."""
        # (A budget wait's start goes only to the re-schedule that continues that wait.)
        own = {k: v for k, v in self._own_headers().items() if k != BUDGET_WAIT_HEADER}
        return {**own, CONTINUES_HEADER: "1" if continues else "0"}

    def _own_headers(self) -> dict[str, Any]:
        """The custom headers of the message this run came from."""
        headers = self.request.headers
        return headers if isinstance(headers, dict) else {}

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Every job that fails for good is kept with its reason in the dead-letter list."""
        self.dead_letter(exc, task_id, list(args or []), dict(kwargs or {}))

    def job_uuid(self, task_id: str | None = None, kwargs: dict[str, Any] | None = None) -> str:
        """The taskUUID a job uses: its `taskUUID` argument, or the one made from its task id."""
        given = (self.request.kwargs or {} if kwargs is None else kwargs).get("taskUUID")
        return self.call_uuid(given if isinstance(given, str) else None, task_id)

    def call_uuid(self, given: str | None, task_id: str | None = None) -> str:
        """The one rule for a call's taskUUID: the one given, else one made from the Celery
        task id (so that every retry and redelivery of the job reuses it)."""
        return given or stable_task_uuid(str(task_id or self.request.id))

    def dead_letter(
        self, exc: BaseException, task_id: str, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        """Record a job that failed for good, with its reason (and count it)."""
        task_uuid = self.job_uuid(task_id, kwargs)
        metrics.JOBS.labels(self.name, "failure").inc()
        metrics.DEAD_LETTERS.labels(self.name).inc()
        try:
            get_dead_letters().record(
                task_uuid, self.name, f"{type(exc).__name__}: {exc}", task_id, args, kwargs
            )
        except redis.RedisError as error:  # the failure itself is still in the result backend
            logger.error("Could not record job %s as a dead letter: %s", task_id, error)

    # --- the call ------------------------------------------------------------------------------
    def call_runware(self, job: RunwareJob) -> TaskOutcome:
        """Reserve the estimate under the budgets, submit or poll the task, record its cost once.

        One script starts the call (a finished task's items come back at once, without calling
        Runware; else the reservation, the submission marker and whether to send it alone) and
        one ends it (the cost recorded once, with the items). What happens to the reservation
        when the call does not end: a re-schedule or a retry keeps it (the next run takes it
        up); Runware refusing the call drops it (nothing was billed); anything else may leave a
        call Runware accepted, so the reservation is left unsettled for the reconciler.
        """
        ledger, limiter = get_ledger(), get_limiter()
        if limiter.refused():  # granted before the pause: no call with a refused key
            raise self._wait_for_a_key()
        task_uuid, shape = job.task_uuid, call_shape(job.body)
        started = ledger.begin(task_uuid, job.account, job.estimate_usd, shape)
        if started.finished is not None:  # a redelivered or resent job whose call finished
            logger.info("taskUUID %s already finished; returning its result.", task_uuid)
            return TaskOutcome(task_uuid, started.finished)
        try:
            outcome = self._submit_or_poll(job, started, limiter)
        except (Ignore, Retry):
            raise
        except TransientError as exc:
            if exc.code == UNATTRIBUTED:  # its next call goes in a request of its own
                get_pending().send_alone(task_uuid)
            raise
        except AuthenticationError:
            # Refused before any work: nothing was billed, unless this was a poll of a call
            # Runware accepted earlier (its reservation stays until the poll succeeds).
            if started.submitted is None:
                ledger.release(task_uuid)
            raise
        except PermanentError:
            ledger.release(task_uuid)
            self._forget_webhook(job)
            raise
        except BaseException as exc:
            ledger.give_up(task_uuid)
            if isinstance(exc, TaskTimeout):
                self._forget_webhook(job)
            raise
        ledger.end(task_uuid, job.account, outcome.cost, outcome.items, shape)
        return outcome

    def _submit_or_poll(self, job: RunwareJob, started: Started, limiter: Limiter) -> TaskOutcome:
        """One call to Runware (a run holds one slot): submit the task, or poll it; the fleet
        hears how it went (`Limiter.heard`)."""
        client, pending = get_client(), get_pending()
        task_uuid, submitted = job.task_uuid, started.submitted
        # (a sync call expects no webhook: no token is made for it)
        hook = (
            webhook_url(get_settings(), job.body, str(self.request.id))
            if job.deliver_async
            else None
        )
        if submitted is None:
            body = job.body if hook is None else {**job.body, "webhookURL": hook}
            try:
                with self._call_span(job, "submit"):
                    outcome = limiter.heard(lambda: client.run(body, alone=started.alone))
                    tracing.on_call(_traced_outcome(outcome, done=not job.deliver_async))
            except ConflictTaskUUID:
                # An earlier attempt was accepted and its answer lost: fetch it with a poll, in
                # a run of its own (with a slot of its own), never by sending it again.
                pending.mark(task_uuid, job.timeout_s)
                raise self.reschedule(
                    0.0, f"taskUUID {task_uuid} was already accepted by Runware; polling it"
                ) from None
            if not job.deliver_async:
                return outcome
            pending.mark(task_uuid, job.timeout_s)
            if hook is not None:
                get_inbox().expect(task_uuid)
            raise self.reschedule(
                self._next_poll_in(0.0, hook), f"submitted {task_uuid} to Runware, polling later"
            )
        if hook is not None:  # the webhook may have brought it: then no call
            hooked = self._from_webhook(job)
            if hooked is not None:
                return hooked
        tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
        if limiter.passed_without_a_grant(
            tag if isinstance(tag, str) else None
        ):  # (a webhook's mark, and its items are not here)
            raise self.reschedule(0.0, f"was passed without a grant; {task_uuid} waits for one")
        with self._call_span(job, "poll"):
            done, outcome = limiter.heard(
                lambda: client.get_response(task_uuid, alone=started.alone)
            )
            tracing.on_call(_traced_outcome(outcome, done))
        if done:
            if hook is not None:  # (its webhook did not come, or not yet)
                metrics.WEBHOOK_MISSED.inc()
                get_inbox().finished(task_uuid, str(self.request.id))
            return outcome
        elapsed = max(0.0, started.now - submitted)  # both by Redis's clock
        if elapsed > job.timeout_s:
            pending.clear(task_uuid)
            raise TaskTimeout(
                f"Runware task {task_uuid} did not finish within {job.timeout_s:g}s; its cost "
                "is settled by the reconciler"
            )
        raise self.reschedule(
            self._next_poll_in(elapsed, hook), f"Runware is still working on {task_uuid}"
        )

    def _call_span(self, job: RunwareJob, call: str) -> AbstractContextManager[object]:
        """The trace's span of one call (tasks/tracing.py); nothing when tracing is off."""
        if not tracing.active():
            return nullcontext()
        body = job.body
        kind = "getResponse" if call == "poll" else str(body.get("taskType", "?"))
        priority = (self.request.kwargs or {}).get("priority", "interactive")
        return tracing.runware_call(
            f"runware {kind}",
            {
                "runware.taskUUID": job.task_uuid,
                "runware.taskType": str(body.get("taskType", "?")),
                "runware.model": str(body.get("model", "")),
                "runware.call": call,
                "enhance.account": job.account,
                "enhance.priority": str(priority),
                "enhance.attempt": int(self.request.retries or 0) + 1,
                "celery.task_id": str(self.request.id),
            },
        )

    def _forget_webhook(self, job: RunwareJob) -> None:
        """A call that may have expected a webhook ended for good."""
        if job.deliver_async and get_settings().runware_webhook_url:
            get_inbox().finished(job.task_uuid, str(self.request.id))

    def _next_poll_in(self, elapsed_s: float, hook: str | None) -> float:
        """The countdown to the next poll: RUNWARE_WEBHOOK_POLL_S when a webhook is expected
        (the fallback for one that never comes), else the growing poll interval."""
        if hook is not None:
            return get_settings().runware_webhook_poll_s
        return get_pending().next_poll_in(elapsed_s)

    def _from_webhook(self, job: RunwareJob) -> TaskOutcome | None:
        """The call's outcome from what its webhooks brought; None when nothing came (the job
        polls). While only some of its items came, and lately, the job waits for the rest
        without a call (a run woken by a webhook has no grant to call with)."""
        inbox, task_uuid = get_inbox(), job.task_uuid
        items, received = inbox.read(task_uuid)
        if received is None:
            return None
        expected, poll_s = expected_items(job.body), get_settings().runware_webhook_poll_s
        if len(items) < expected and not any(map(is_error, items)):
            if time.time() - received > poll_s:
                return None  # the rest is late: poll for it
            raise self.reschedule(
                poll_s, f"Runware's webhooks brought {len(items)} of {expected} items"
            )
        done, outcome = get_client().settle(task_uuid, items)  # (raises a task's error)
        if not done:
            return None
        inbox.finished(task_uuid, str(self.request.id))
        tracing.event(
            "runware webhook", **{"runware.taskUUID": task_uuid, "runware.cost_usd": outcome.cost}
        )
        metrics.WEBHOOK_LAG.observe(max(0.0, time.time() - received))
        logger.info("taskUUID %s finished by Runware's webhook; no poll.", task_uuid)
        return outcome

    # --- the retry policy ----------------------------------------------------------------------
    def _retry_or_give_up(self, exc: TransientError, started: float) -> TransientError:
        """Raise the retry of this job; or, once its retries are spent, return the error it
        fails with."""
        settings = get_settings()
        if exc.code == BUDGET_UNSETTLED:
            # It fits once unsettled calls are reconciled: it waits for that, its retries
            # untouched, for at most RUNWARE_BUDGET_WAIT_MAX_S from its first such refusal.
            since = float(self._own_headers().get(BUDGET_WAIT_HEADER) or time.time())
            left = settings.runware_budget_wait_max_s - (time.time() - since)
            if left > 0:
                countdown = min(exc.retry_after or settings.runware_reconcile_s, left)
                why = f"waits for unsettled calls to be reconciled ({exc})"
                # Not ahead of its account's queue (it is no call under way): like a retry.
                raise self.reschedule(
                    countdown, why, {BUDGET_WAIT_HEADER: repr(since)}, continues=False
                )
        retries = int(self.request.retries or 0)
        limit = _or(self.retry_limit, settings.runware_max_retries)
        if retries >= limit:
            reason = f"{exc} (gave up after {retries} retries)"
            get_ledger().give_up(self.job_uuid())  # Runware may have billed an attempt
            self._log_outcome(logging.ERROR, "gave up", started, reason=reason)
            return type(exc)(reason, code=exc.code, status=exc.status, retry_after=exc.retry_after)
        countdown = backoff_seconds(
            retries,
            _or(self.retry_backoff_s, settings.runware_retry_backoff_s),
            _or(self.retry_backoff_max_s, settings.runware_retry_backoff_max_s),
            exc.retry_after,
            settings.runware_retry_after_max_s,
        )
        metrics.RETRIES.labels(self.name).inc()
        tracing.event(
            "retry", reason=str(exc), countdown_s=countdown, attempt=retries + 2, limit=limit
        )
        logger.warning(
            "Task %s (%s) will retry in %.2fs (retry %d of %d): %s",
            self.request.id,
            self.name,
            countdown,
            retries + 1,
            limit,
            exc,
            extra={"task_id": self.request.id, "taskUUID": self.job_uuid(), "outcome": "retry"},
        )
        raise self.retry(
            exc=exc, countdown=countdown, max_retries=None, headers=self._headers(continues=False)
        )

    def _log_outcome(
        self,
        level: int,
        outcome: str,
        started: float,
        cost: object = None,
        reason: str | None = None,
    ) -> None:
        duration = time.monotonic() - started
        task_uuid = self.job_uuid()
        fields: dict[str, object] = {
            "task_id": self.request.id,
            "task_name": self.name,
            "taskUUID": task_uuid,
            "duration_s": round(duration, 4),
            "outcome": outcome,
        }
        if reason is not None:
            logger.log(
                level,
                "Task %s (%s) %s: taskUUID=%s duration=%.3fs reason=%s",
                self.request.id,
                self.name,
                outcome,
                task_uuid,
                duration,
                reason,
                extra=fields,
            )
            return
        fields["cost"] = cost
        logger.log(
            level,
            "Task %s (%s) %s: taskUUID=%s duration=%.3fs cost=$%s",
            self.request.id,
            self.name,
            outcome,
            task_uuid,
            duration,
            f"{cost:.6f}" if isinstance(cost, int | float) else "?",
            extra=fields,
        )


def _traced_outcome(outcome: TaskOutcome, done: bool) -> dict[str, object]:
    """What a call's span says of its answer: the cost once the task finished."""
    if not done:
        return {"runware.status": "processing"}
    return {"runware.status": "success", "runware.cost_usd": outcome.cost}


def _or(option: N | None, setting: N) -> N:
    """A task's own option when it has one, else the setting."""
    return setting if option is None else option
