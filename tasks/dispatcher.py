"""The fair intake: how a job gets from the Celery queue to a worker thread, fairly and within
the fleet's limits, whatever the size of the backlog in front of it.

    producers ─▶ the fleet's Celery queue `enhance` (kombu's Redis list, FIFO)
                    │ the dispatcher reads every message as it arrives (tasks/messages.py),
                    │ then moves it (pump.lua, atomic, checking it is the message it read)
                    ├──▶ delayed (sorted set by due time): countdowns, retries, polls
                    ▼
      q:i/<account>, q:b/<account>   waiting jobs, one list per account and priority class
                    │ grants, as the limits allow: rate, in-flight cap, free worker threads,
                    │ cool-down, per-account rate; interactive first (batch >= 1 in 10);
                    │ weighted deficit round-robin between accounts
                    ▼
      <prefix>.ready   the Celery queue every worker thread consumes: granted jobs only
                    │ the worker's transport takes custody (kombu's unacked entry) and clears
                    ▼ the grant's transit record in the same transaction
      worker thread: one call to Runware; the acknowledgement gives the slot back (leases)

One dispatcher serves the fleet: every worker process runs a candidate thread, and the one that
holds a lock in Redis pumps; if its process dies the lock expires and another takes over. Each
step is one Lua script (tasks/lua/pump.lua), so a kill at any instant loses no message; the
message is never changed, so results, chains, chords, Flower and AsyncResult work as before.

Waiting never holds a worker thread, and no job waits in a worker's memory: a job is granted
only when a thread is free to start it (leases < the fleet's registered threads), so granted
jobs never pile up and then burst out faster than the rate.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from config.keys import KOMBU_UNACKED, FairKeys, celery_queue_keys, other_layout_keys
from config.settings import Settings
from tasks import messages, metrics, scripts, tracing, unknown
from tasks.deadletter import DeadLetters, get_dead_letters
from tasks.limiter import Limiter
from tasks.scripts import Pump, Wait
from tasks.state import seconds as redis_seconds
from tasks.state import text

logger = logging.getLogger(__name__)

MAX_STREAK = 9  # interactive grants in a row while batch waits: batch keeps >= 1 slot in 10
LOCK_MS = 3000
HEARTBEAT_S = 2.0
REGISTRATION_S = 6  # a worker that stops heartbeating leaves the fleet's thread count after it
MAX_READ = 50  # messages read per step (each read here, tasks/messages.py, not in Redis)
MAX_GRANTS = 50  # grants per step: with the reads, a step stays within a few ms of Redis
TRANSIT_CHECK_S = 15.0  # a granted message out of the ready queue this long, not in custody: lost

# The step's KEYS and ARGV by name, in the order pump.lua declares them (its KEY_NAMES and
# ARG_NAMES): the script's header is the one list.
PUMP_KEYS = scripts.declared("pump", "KEY_NAMES")
PUMP_ARGS = scripts.declared("pump", "ARG_NAMES")
COALESCE_S = 0.005  # when every slot is taken: how long releases are gathered into one step
PRIORITY_NAMES = {"i": "interactive", "b": "batch"}
TAKEN_KINDS = frozenset({messages.CALL, messages.PASS})  # jobs a worker of the fleet will run


@dataclass(frozen=True)
class Intake:
    """What the dispatcher reads and grants: the Celery queues (kombu's list names, in
    consumption order), the tasks that call Runware, and every task the workers know."""

    queues: tuple[str, ...]
    runware_tasks: frozenset[str]
    known_tasks: frozenset[str]

    def as_json(self) -> str:
        return json.dumps(
            {
                "queues": list(self.queues),
                "runware": sorted(self.runware_tasks),
                "known": sorted(self.known_tasks),
            }
        )

    def union(self, others: list[bytes]) -> Intake:
        """This intake with every other live worker's (their JSON, as heartbeat.lua returns
        them): its own queues first (the blocking wait watches the first), then the others'."""
        queues, runware, known = list(self.queues), set(self.runware_tasks), set(self.known_tasks)
        for raw in others:
            try:
                other = json.loads(raw)
                more = [str(q) for q in other["queues"]]
                runware.update(str(t) for t in other["runware"])
                known.update(str(t) for t in other["known"])
            except (ValueError, KeyError, TypeError):
                continue  # written by another version: its own beat will say it again
            queues.extend(q for q in sorted(more) if q not in queues)
        return Intake(tuple(queues), frozenset(runware), frozenset(known))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def live_workers(client: redis.Redis, keys: FairKeys) -> list[str]:
    """The worker processes whose heartbeat has not expired (by Redis's clock)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zrange(keys.workers_seen, 0, -1, withscores=True)
        clock, seen = pipe.execute()
    now = redis_seconds(clock)
    return [(w.decode() if isinstance(w, bytes) else str(w)) for w, expiry in seen if expiry > now]


class Dispatcher(threading.Thread):
    """This process's candidate for the fleet's dispatcher, and its heartbeat: it registers the
    process's worker threads, takes the dispatcher role when the lock is free, and pumps."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        intake: Intake,
        threads: int,
        limiter: Limiter | None = None,
        ident: str | None = None,
        dead_letters: DeadLetters | None = None,
        on_waiting: Callable[[list[messages.Read]], None] | None = None,
    ) -> None:
        super().__init__(name="fair-dispatcher", daemon=True)
        self.redis = client
        self.settings = settings
        self.own_intake = intake  # what this worker reads (its -Q and its tasks)
        self.intake = intake  # what the fleet reads: the union of every live worker's
        self.threads = threads
        self.limiter = limiter  # told when the fleet has cool-down strikes to clear
        self.keys = FairKeys(settings.key_prefix)
        self.id = ident or worker_id()
        self._stopped = threading.Event()
        self._pump = scripts.register(client, scripts.PUMP)
        self._heartbeat = scripts.register(client, "heartbeat")
        self._last_beat = 0.0
        self._other_layouts: list[str] = []  # lists of producers with other priority steps
        self._unread = True  # whether messages may wait to be read before the next step
        self._own_intake_json = intake.as_json()  # said in every heartbeat
        self._set_sources()
        self._clock_skew = 0.0  # Redis's clock minus this host's, for the delayed jobs due
        self._dead_letters = dead_letters
        self._returned_for: frozenset[str] = frozenset()  # the tasks parked jobs were checked for
        # Told of the jobs each step takes into the fair intake and leaves waiting there
        # (workers/events.py: the task-sent events that show them in Flower while they wait).
        self._on_waiting = on_waiting
        self._read: list[messages.Read | None] = []  # the last step's reads, in ARGV order
        self._moved: bytes | None = None  # what the blocking wait moved into the empty intake
        self._waits = tracing.IntakeWaits()  # (with tracing on) the traceparents of waiting jobs

    # --- life cycle ---
    def stop(self) -> None:
        """Stop pumping and leave the fleet's thread count (at once, not after expiry)."""
        self._stopped.set()

    def leave(self) -> None:
        try:
            self._beat(0)
            if self.redis.get(self.keys.dispatcher) == self.id.encode():
                self.redis.delete(self.keys.dispatcher)
        except redis.RedisError as exc:
            logger.warning("Could not leave the fleet cleanly (%s); it expires.", exc)

    def _beat(self, threads: int) -> None:
        keys = self.keys
        reply = self._heartbeat(
            keys=[keys.workers, keys.workers_seen, keys.strikes, keys.intakes],
            args=[self.id, threads, REGISTRATION_S, self._own_intake_json],
        )
        if reply[0] and self.limiter is not None:
            self.limiter.strikes = True
        if threads:
            self._serve(self.own_intake.union(reply[1:]))
            self._look_for_other_layouts()
            self._watch_waiting()

    def _serve(self, intake: Intake) -> None:
        """Read and grant for `intake` from the next step on: workers started with different
        -Q sets or task modules are all served, whichever of them holds the role."""
        if intake == self.intake:
            return
        if set(intake.queues) != set(self.own_intake.queues) or (
            intake.runware_tasks != self.own_intake.runware_tasks
        ):
            logger.warning(
                "Workers of the fleet read different queues or know different tasks; the "
                "dispatcher serves them all: queues %s (this worker's: %s), %d task(s) that call "
                "Runware.",
                ", ".join(intake.queues),
                ", ".join(self.own_intake.queues),
                len(intake.runware_tasks),
            )
        self.intake = intake
        self._set_sources()

    def _set_sources(self) -> None:
        """The lists the steps read (the fleet's queues in kombu's layout, then the lists of
        producers with another layout), and the step's keys and arguments with them."""
        self._source_keys = celery_queue_keys(self.intake.queues) + self._other_layouts
        self._pump_keys, self._pump_args = self._pump_keys_args()

    def _look_for_other_layouts(self) -> None:
        """Read, too, the lists a producer with other kombu `priority_steps` or `sep` filled
        (checked every heartbeat: one TYPE per possible list), so that its jobs are served
        rather than left where no worker looks."""
        candidates = other_layout_keys(self.intake.queues)
        with self.redis.pipeline(transaction=False) as pipe:
            for key in candidates:
                pipe.type(key)
            kinds = pipe.execute()
        # Lists only: another app's key of that name (a hash `enhance:3`) is none of ours. A
        # list once seen is read while it is empty (gone) too, until it holds something else.
        kind_of = {key: text(kind) for key, kind in zip(candidates, kinds, strict=True)}
        found = sorted(
            key
            for key, kind in kind_of.items()
            if kind == "list" or (kind == "none" and key in self._other_layouts)
        )
        if found == self._other_layouts:
            return
        new = [key for key in found if key not in self._other_layouts]
        self._other_layouts = found
        self._set_sources()
        if not new:
            return
        logger.warning(
            "Messages in %s: a producer sends with kombu `priority_steps` or `sep` other than "
            "the workers' (steps 0, 3, 6, 9 and kombu's separator); the dispatcher reads them "
            "too, but their Celery priority is not used. Configure producers without those "
            "transport options.",
            ", ".join(repr(k) for k in new),
        )

    def _watch_waiting(self) -> None:
        """Gauges of jobs that wait for something other than the rate: those in the fleet's own
        queue (CELERY_TASK_DEFAULT_QUEUE) while no live worker reads it (every one started with
        a -Q that leaves it out; the alert QueueWithoutReader, 0 while it is read), and those
        parked because no live worker registers their task (JobsOfUnknownTask)."""
        queue = self.settings.celery_task_default_queue
        unread = queue not in self.intake.queues
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.keys.unknown)
            for key in celery_queue_keys([queue]) if unread else []:
                pipe.llen(key)
            parked, *waiting = pipe.execute()
        metrics.UNREAD_QUEUE.labels(queue).set(sum(waiting))
        metrics.UNKNOWN_TASK_JOBS.set(parked)

    def _return_known(self) -> None:
        """Send the parked jobs of unknown tasks whose task a live worker now registers back to
        their queue (looked at when the fleet's tasks change, and on taking the role)."""
        known = self.intake.known_tasks
        if known == self._returned_for:
            return
        self._returned_for = known
        sent = unknown.UnknownTasks(self.redis, self.keys).return_known(known)
        if sent:
            logger.info("%d parked job(s) of tasks a worker now registers went back.", sent)

    def run(self) -> None:
        holding = False
        while not self._stopped.is_set():
            try:
                if time.monotonic() - self._last_beat >= HEARTBEAT_S:
                    self._beat(self.threads)
                    self._clock_skew = redis_seconds(self.redis.time()) - time.time()
                    self._last_beat = time.monotonic()
                    if holding:
                        if self.redis.llen(self.keys.rejected):  # a filing that failed
                            self._file_rejected()
                        self._return_known()
                if not holding:
                    holding = bool(
                        self.redis.set(self.keys.dispatcher, self.id, nx=True, px=LOCK_MS)
                    )
                    if not holding:
                        self._stopped.wait(random.uniform(0.3, 0.7))
                        continue
                    self._returned_for = frozenset()  # the parked jobs are looked at anew
                holding = self._step()
            except (redis.RedisError, OSError) as exc:
                if self._stopped.is_set():
                    break
                logger.warning("The fair dispatcher lost Redis (%s); retrying.", exc)
                holding = False
                self._stopped.wait(0.5)
            except Exception:  # a bug must not end the fleet's dispatching for good
                logger.exception("The fair dispatcher failed; retrying in 1 s.")
                holding = False
                self._stopped.wait(1.0)
        self.leave()

    # --- one step ---
    def _pump_keys_args(self) -> tuple[list[str], list[str | int | float]]:
        """The step's KEYS and ARGV, in the order pump.lua declares them, then the Celery queues
        to take jobs from."""
        keys, args = pump_keys(self.keys), pump_args(self.id, self.settings)
        script_keys = [keys[name] for name in PUMP_KEYS] + list(self._source_keys)
        return script_keys, [args[name] for name in PUMP_ARGS]

    def _reads(self) -> list[str | int | float]:
        """What the step's reads say (pump.lua): the messages waiting at the tail of the intake
        list and of each Celery queue (at most MAX_READ in all), and the delayed ones due by
        now, each read here (tasks/messages.py) with its fingerprint."""
        if self._moved is not None:
            # The blocking wait just moved this message into the empty intake list: it is the
            # whole reading, with no round trip to look. (Were it not at the list's tail, the
            # step would see another fingerprint and leave the list for the next step; messages
            # that came meanwhile elsewhere count as unread, and the next step reads them.)
            moved, self._moved = self._moved, None
            replies: list[list[bytes]] = [[moved], *([] for _ in range(len(self._source_keys) + 1))]
        else:
            sources = [self.keys.intake, *self._source_keys]
            due_by = time.time() + self._clock_skew + 0.5
            with self.redis.pipeline(transaction=False) as pipe:
                for key in sources:
                    pipe.lrange(key, -MAX_READ, -1)
                pipe.zrangebyscore(self.keys.delayed, "-inf", due_by, start=0, num=MAX_READ)
                replies = pipe.execute()
        runware, known = self.intake.runware_tasks, self.intake.known_tasks
        reads: list[str | int | float] = []
        budget = MAX_READ
        self._read = taken = []

        def section(raws: list[bytes], delayed: bool = False) -> None:
            reads.append(len(raws))
            for raw in raws:
                found = messages.read(raw, runware, known)
                taken.append(None if delayed else found)  # a delayed one was taken in before
                due = "" if found.due is None else repr(found.due)
                reads.extend(
                    (messages.fingerprint(raw), found.code(), found.account, found.task_id)
                )
                reads.extend((found.tag, due))

        for waiting in replies[:-1]:
            oldest_first = waiting[::-1][:budget]  # the order RPOP takes them in
            budget -= len(oldest_first)
            section(oldest_first)
        section(replies[-1], delayed=True)
        return reads

    def pump(self) -> tuple[int, float, int, float]:
        """One step (tasks/lua/pump*.lua): (code, wait, granted, due_in); dwell times go to the
        metrics."""
        script_keys, args = self._pump_keys, self._pump_args
        # Messages are looked at only when the last step said some wait to be read (or one was
        # just taken in by the blocking wait): a step with nothing to read is one round trip.
        self._read = []
        reads = self._reads() if self._unread else [0] * (len(self._source_keys) + 2)
        step = scripts.PumpReply.of(scripts.run(self._pump, script_keys, [*args, *reads]))
        self._unread = step.code != Pump.OK or bool(step.unread)
        if step.read and (self._on_waiting is not None or tracing.active()):
            # The step takes messages in the order they were read (up to a list whose next
            # message someone else took): the first `read` of them.
            jobs = [r for r in self._read[: step.read] if r and r.kind in TAKEN_KINDS]
            for job in jobs:  # (with tracing on: the span of its wait is made at its grant)
                if job.kind == messages.CALL and not job.continues:
                    self._waits.taken_in(job.task_id, job.traceparent)
            if self._on_waiting is not None:
                # A call granted in the step that took it in does not wait: a worker thread
                # takes it at once, and its task-received event shows it a moment later.
                granted = {grant.task_id for grant in step.grants}
                waiting = [j for j in jobs if j.kind != messages.CALL or j.task_id not in granted]
                if waiting:
                    self._on_waiting(waiting)
        if step.rejected:
            self._file_rejected()
        for grant in step.grants:
            priority = PRIORITY_NAMES[grant.klass]
            metrics.LIMIT_WAIT.labels(metrics.ACCOUNTS.label(grant.account), priority).observe(
                grant.waited
            )
            self._waits.granted(grant.task_id, grant.account, priority, grant.waited)
        if step.recovered:
            logger.warning(
                "%d granted job(s) were lost between the ready queue and a worker; "
                "they are queued again.",
                step.recovered,
            )
        return step.code, step.wait, step.granted, step.due_in

    def _file_rejected(self) -> None:
        """File the messages the step (or a worker) set aside: an unreadable one in the dead
        letters, with its reason; one of a task no worker registers with the parked jobs of
        unknown tasks; any other (a worker that does not register its task handed it back)
        into the intake again. A message leaves the broker's list only once it is filed."""
        dead = self._dead_letters or get_dead_letters()
        waiting: list[bytes] = self.redis.lrange(self.keys.rejected, 0, -1)  # type: ignore[assignment]
        for raw in waiting[::-1]:
            found = messages.read(raw, self.intake.runware_tasks, self.intake.known_tasks)
            if found.kind == messages.OTHER:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lpush(self.keys.unknown, raw)
                    pipe.lrem(self.keys.rejected, -1, raw)  # type: ignore[arg-type]
                    pipe.execute()
                logger.warning(
                    "A job of task %r, which no live worker of the fleet registers, is parked "
                    "until one does (`enhance-worker unknown list`).",
                    unknown.describe(raw).task,
                )
                continue
            if found.kind != messages.BAD:  # a worker handed it back, or its task is known now
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lpush(self.keys.intake, raw)
                    pipe.lrem(self.keys.rejected, -1, raw)  # type: ignore[arg-type]
                    pipe.execute()
                self._unread = True
                continue
            ident = dead.record_unreadable(raw, found.reason or "unreadable", found.task)
            self.redis.lrem(self.keys.rejected, -1, raw)  # type: ignore[arg-type]
            logger.error(
                "A message no worker could read (%s) was set aside: `enhance-worker failed list` "
                "shows it as %s.",
                found.reason,
                ident,
            )

    def _step(self) -> bool:
        """Pump once and wait as long as nothing can change; False if the role was lost."""
        code, wait, _, due_in = self.pump()
        if code == Pump.NOT_DISPATCHER:
            self._waits.forget()
            return False
        if wait == Wait.NOW:
            return True
        timeout = 1.0 if wait < 0 else min(wait, 1.0)  # renew the lock at least each second
        if due_in >= 0:
            timeout = min(timeout, due_in)
        if wait == Wait.NOBODY_WAITS:
            # Nothing waits: block until a job arrives in the Celery queue (it is moved, not
            # popped, so a kill here loses nothing: the next step reads the intake list). With
            # webhooks on, while jobs are parked, a webhook can make one due at any moment
            # (tasks/webhooks.py): it is looked for every quarter second.
            if due_in >= 0 and self.settings.runware_webhook_url:
                timeout = min(timeout, 0.25)
            if timeout > 0.1:
                # (Redis takes a fractional timeout; redis-py's annotation says int.)
                moved = self.redis.blmove(
                    self._source_keys[0],
                    self.keys.intake,
                    timeout,  # type: ignore[arg-type]
                    "RIGHT",
                    "LEFT",
                )
                if moved is not None:
                    self._unread = True
                    self._moved = moved if isinstance(moved, bytes) else None
            else:
                self._stopped.wait(timeout)
        elif timeout <= 0.25:
            # The next slot is near. Redis checks a blocked command's timeout only every
            # 1/hz s (100 ms by default): far too coarse for this, so sleep here.
            self._stopped.wait(timeout)
        else:
            # Wait for a slot given back (a release wakes us) or the next slot, looking at new
            # arrivals at least every quarter second. When every slot is taken, releases come
            # in bursts (one per task of a shared request): let a few arrive, so that one step
            # grants them all.
            woken = self.redis.blpop([self.keys.wake], timeout=min(timeout, 0.25))
            if woken is not None and wait == Wait.NO_FREE_SLOT:
                self._stopped.wait(COALESCE_S)
        return True


def pump_keys(keys: FairKeys) -> dict[str, str]:
    """The step's keys by the names pump.lua gives them."""
    return {
        "intake": keys.intake,
        "delayed": keys.delayed,
        "ready": keys.ready,
        "leases": keys.leases,
        "transit": keys.transit,
        "transit_at": keys.transit_at,
        "workers": keys.workers,
        "workers_seen": keys.workers_seen,
        "dispatcher": keys.dispatcher,
        "overrides": keys.overrides,
        "tat": keys.tat,
        "cooldown": keys.cooldown,
        "account_rate": keys.account_rate,
        "account_weight": keys.account_weight,
        "account_tat": keys.account_tat,
        "streak": keys.streak,
        "wake": keys.wake,
        **{
            f"{klass}_{part}": key
            for klass in ("i", "b")
            for part, key in (
                ("active", keys.active(klass)),
                ("ring", keys.ring(klass)),
                ("credit", keys.credit(klass)),
                ("queue", keys.queue_prefix(klass)),
            )
        },
        "unacked": KOMBU_UNACKED,
        "busy": keys.busy,
        "pushed": keys.ready_pushed,
        "transit_left": keys.transit_left,
        "transit_legacy": keys.transit_legacy,
        "parked": keys.parked,
        "rejected": keys.rejected,
        "parked_polls": keys.parked_polls,
        "hooked": keys.hooked,
    }


def pump_args(ident: str, settings: Settings) -> dict[str, str | int | float]:
    """The step's arguments by the names pump.lua gives them."""
    return {
        "dispatcher_id": ident,
        "lock_ms": LOCK_MS,
        "rate": settings.runware_rate_limit or 0,
        "burst": settings.runware_rate_burst,
        "cap": settings.runware_max_in_flight or 0,
        "account_rate": settings.runware_account_rate_limit or 0,
        "lease_s": settings.lease_s,
        "max_streak": MAX_STREAK,
        "max_read": MAX_READ,
        "max_grants": MAX_GRANTS,
        "transit_age": TRANSIT_CHECK_S,
    }
