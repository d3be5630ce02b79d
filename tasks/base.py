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
  and the retry count. The rules are tasks/policy.py's, as pure decisions; this class applies
  them.
- Every job's outcome is logged once (taskUUID, duration, cost or reason) and counted in the
  metrics (tasks/metrics.py); a job that fails for good is kept as a dead letter.
- Waiting for Runware to finish an async task is not failing: the job is re-scheduled with a
  countdown (kept in Redis by the fair intake, not in a worker) and its retry budget is
  untouched. A job reaches a worker only once the fleet granted it a slot (tasks/dispatcher.py),
  and makes at most one call to Runware per run; the slot goes back when it is acknowledged.
- Every call reserves its estimated cost under the budgets first and records its real cost once;
  a call whose outcome the job could not learn is left for the reconciler (tasks/reconcile.py).
  One object owns the reservation (tasks/reservation.py's ReservedCall).
- What a task works with (the ledger, the limiter, the Runware client, the poll markers, the
  webhook inbox, the dead letters, the settings) is handed to it once, as `Collaborators`: this
  process's by default, fakes in unit tests.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry

from config.settings import Settings, get_settings
from enhance_client.schemas import stable_task_uuid
from tasks import metrics, tracing
from tasks.deadletter import DeadLetters, get_dead_letters
from tasks.errors import (
    AuthenticationError,
    ConflictTaskUUID,
    PermanentError,
    TaskTimeout,
    TransientError,
    ValidationError,
    WorkerError,
    for_policy,
)
from tasks.ledger import Ledger, Started, call_shape, get_ledger
from tasks.limiter import Limiter, get_limiter
from tasks.messages import CONTINUES_HEADER
from tasks.policy import Decision, GiveUp, RetryIn, RetryPolicy, WaitForBudget, backoff_seconds
from tasks.polling import PendingCalls, get_pending
from tasks.reservation import ReservedCall
from tasks.runware import UNATTRIBUTED, RunwareClient, TaskOutcome, get_client
from tasks.webhooks import Inbox, expected_items, get_inbox, is_error, webhook_url

logger = logging.getLogger(__name__)
BUDGET_WAIT_HEADER = "enhance_budget_wait_since"  # when a job's first such refusal came
KEY_WAIT_S = 1.0  # a job sent back while the key is refused: due again at once, then held


__all__ = ["Collaborators", "RunwareJob", "RunwareTask", "backoff_seconds"]


@dataclass(frozen=True)
class Collaborators:
    """What a RunwareTask works with, handed to it once (`RunwareTask.use`); by default this
    process's own, made on first use. Unit tests hand it fakes (tests/unit/test_policy.py)."""

    settings: Settings
    ledger: Ledger
    limiter: Limiter
    client: RunwareClient
    pending: PendingCalls
    inbox: Inbox
    dead_letters: DeadLetters

    @classmethod
    def of_this_process(cls) -> Collaborators:
        return cls(
            get_settings(),
            get_ledger(),
            get_limiter(),
            get_client(),
            get_pending(),
            get_inbox(),
            get_dead_letters(),
        )


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
    _collaborators: tuple[int, Collaborators] | None = None  # (the process they belong to, them)

    @property
    def services(self) -> Collaborators:
        """What this task works with (see Collaborators): this process's, unless handed others."""
        held = self._collaborators
        if held is None or held[0] != os.getpid():  # (a forked child makes its own)
            held = self._collaborators = (os.getpid(), Collaborators.of_this_process())
        return held[1]

    def use(self, collaborators: Collaborators) -> None:
        """Work with these collaborators in this process from now on."""
        self._collaborators = (os.getpid(), collaborators)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body (`run`) under the retry policy. Celery's worker calls this with the
        job's request already pushed, so it calls `run` directly (`Task.__call__` would push
        an empty request over it)."""
        started = time.monotonic()
        try:
            # A job granted a slot is on its way to a Runware call: a request this process's
            # other threads hold open waits for it (tasks/batching.py), and for nothing else.
            with self.services.client.on_the_way(self.request.id):
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
                    self.services.limiter.refuse_key(str(error))
                except redis.RedisError as failure:  # this process stays refused all the same
                    logger.warning("Could not pause the fleet for the refused key: %s", failure)
                raise self._wait_for_a_key() from None
            if isinstance(error, TransientError):
                decision = self._after_transient(error)
                if not isinstance(decision, GiveUp):
                    raise self._run_again(decision, error) from None
                error = decision.error
                self._log_outcome(logging.ERROR, "gave up", started, reason=str(error))
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
            self.services.dead_letters.record(
                task_uuid, self.name, f"{type(exc).__name__}: {exc}", task_id, args, kwargs
            )
        except redis.RedisError as error:  # the failure itself is still in the result backend
            logger.error("Could not record job %s as a dead letter: %s", task_id, error)

    # --- the call ------------------------------------------------------------------------------
    def call_runware(self, job: RunwareJob) -> TaskOutcome:
        """Reserve the estimate under the budgets, submit or poll the task, record its cost once.

        One script starts the call (a finished task's items come back at once, without calling
        Runware; else the reservation, the submission marker and whether to send it alone) and
        one ends it (the cost recorded once, with the items). The reservation has one owner,
        tasks/reservation.py's ReservedCall: the exception the call ends with decides whether
        it is kept for the job's next run, released or given up to the reconciler.
        """
        services = self.services
        if services.limiter.refused():  # granted before the pause: no call with a refused key
            raise self._wait_for_a_key()
        policy = RetryPolicy.of(self, services.settings)
        reserved = ReservedCall(
            services.ledger,
            job.task_uuid,
            job.account,
            job.estimate_usd,
            call_shape(job.body),
            last_attempt=policy.last_attempt(int(self.request.retries or 0)),
        )
        with reserved:
            finished = reserved.started.finished
            if finished is not None:  # a redelivered or resent job whose call finished
                logger.info("taskUUID %s already finished; returning its result.", job.task_uuid)
                return TaskOutcome(job.task_uuid, finished)
            try:
                outcome = self._submit_or_poll(job, reserved.started)
            except TransientError as exc:
                if exc.code == UNATTRIBUTED:  # its next call goes in a request of its own
                    services.pending.send_alone(job.task_uuid)
                raise
            except (PermanentError, TaskTimeout) as exc:
                if not isinstance(exc, AuthenticationError):  # (its poll waits for the key)
                    self._forget_webhook(job)
                raise
        # (After the `with`: a failure to record it keeps the reservation for the next run.)
        reserved.finish(outcome.cost, outcome.items)
        return outcome

    def _submit_or_poll(self, job: RunwareJob, started: Started) -> TaskOutcome:
        """One call to Runware (a run holds one slot): submit the task, or poll it; the fleet
        hears how it went (`Limiter.heard`)."""
        services = self.services
        client, pending, limiter = services.client, services.pending, services.limiter
        task_uuid, submitted = job.task_uuid, started.submitted
        # (a sync call expects no webhook: no token is made for it)
        hook = (
            webhook_url(services.settings, job.body, str(self.request.id))
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
                services.inbox.expect(task_uuid)
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
                services.inbox.finished(task_uuid, str(self.request.id))
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
        if job.deliver_async and self.services.settings.runware_webhook_url:
            self.services.inbox.finished(job.task_uuid, str(self.request.id))

    def _next_poll_in(self, elapsed_s: float, hook: str | None) -> float:
        """The countdown to the next poll: RUNWARE_WEBHOOK_POLL_S when a webhook is expected
        (the fallback for one that never comes), else the growing poll interval."""
        if hook is not None:
            return self.services.settings.runware_webhook_poll_s
        return self.services.pending.next_poll_in(elapsed_s)

    def _from_webhook(self, job: RunwareJob) -> TaskOutcome | None:
        """The call's outcome from what its webhooks brought; None when nothing came (the job
        polls). While only some of its items came, and lately, the job waits for the rest
        without a call (a run woken by a webhook has no grant to call with)."""
        inbox, task_uuid = self.services.inbox, job.task_uuid
        items, received = inbox.read(task_uuid)
        if received is None:
            return None
        expected, poll_s = expected_items(job.body), self.services.settings.runware_webhook_poll_s
        if len(items) < expected and not any(map(is_error, items)):
            if time.time() - received > poll_s:
                return None  # the rest is late: poll for it
            raise self.reschedule(
                poll_s, f"Runware's webhooks brought {len(items)} of {expected} items"
            )
        done, outcome = self.services.client.settle(task_uuid, items)  # (raises a task's error)
        if not done:
            return None
        inbox.finished(task_uuid, str(self.request.id))
        tracing.event(
            "runware webhook", **{"runware.taskUUID": task_uuid, "runware.cost_usd": outcome.cost}
        )
        metrics.WEBHOOK_LAG.observe(max(0.0, time.time() - received))
        logger.info("taskUUID %s finished by Runware's webhook; no poll.", task_uuid)
        return outcome

    # --- the retry policy (its rules: tasks/policy.py) ---------------------------------------
    def _after_transient(self, exc: TransientError) -> Decision:
        """What this job does after `exc` (tasks/policy.py)."""
        since = self._own_headers().get(BUDGET_WAIT_HEADER)
        return RetryPolicy.of(self, self.services.settings).after(
            exc,
            int(self.request.retries or 0),
            float(since) if since else None,
            time.time(),
        )

    def _run_again(self, decision: WaitForBudget | RetryIn, exc: TransientError) -> Ignore | Retry:
        """The exception that ends this run and sends the job again as `decision` says: a
        re-schedule with its retries untouched, or a Celery retry."""
        if isinstance(decision, WaitForBudget):
            # Not ahead of its account's queue (it is no call under way): like a retry.
            return self.reschedule(
                decision.countdown,
                decision.why,
                {BUDGET_WAIT_HEADER: repr(decision.since)},
                continues=False,
            )
        metrics.RETRIES.labels(self.name).inc()
        tracing.event(
            "retry",
            reason=str(exc),
            countdown_s=decision.countdown,
            retry=decision.attempt,
            limit=decision.limit,
        )
        logger.warning(
            "Task %s (%s) will retry in %.2fs (retry %d of %d): %s",
            self.request.id,
            self.name,
            decision.countdown,
            decision.attempt,
            decision.limit,
            exc,
            extra={"task_id": self.request.id, "taskUUID": self.job_uuid(), "outcome": "retry"},
        )
        retry: Retry = self.retry(
            exc=exc,
            countdown=decision.countdown,
            max_retries=None,
            headers=self._headers(continues=False),
            throw=False,
        )
        return retry

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
