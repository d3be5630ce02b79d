"""The Redis key layout of the service, written once: Python, the Lua scripts (which get every
key through KEYS, but for a day's cost totals, named by the reservation a script reads, and the
per-account queues, built from a prefix passed in KEYS) and
the metrics all take their names from here.

Two rules make every key safe from every account label that passes validation:
- a key built from an account label puts the label last, after a `/`;
- labels may not contain `/` (letters, digits and `_.:@-` only), and no fixed part does.
So two keys are equal only when their kind and their label are, and no label can reach another
account's key or one of the service's own.

The fair queues and the limits live in the broker's Redis (they move broker messages atomically);
the ledger, the poll markers and the dead letters in the state Redis (LIMITER_REDIS_URL, default
REDIS_URL). In the default set-up both are the same database.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIORITY_CLASSES = {"interactive": "i", "batch": "b"}
# kombu's Redis transport keeps a queue's messages of higher Celery priority in lists named
# queue + SEP + step; it consumes the plain list first.
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
# kombu's hash of delivered, unacknowledged messages (its `unacked_key`, which this project
# leaves at kombu's default).
KOMBU_UNACKED = "unacked"


def other_layout_keys(queues: tuple[str, ...] | list[str]) -> list[str]:
    """The lists a producer with other kombu `priority_steps` or `sep` would put these queues'
    messages in (Celery's documentation suggests steps 0..9 and sep ':' for Redis): every step
    1..9 under kombu's separator and under ':', less the lists `celery_queue_keys` names."""
    usual = set(celery_queue_keys(queues))
    return [
        key
        for name in queues
        for sep in (KOMBU_PRIORITY_SEPARATOR, ":")
        for step in range(1, 10)
        if (key := f"{name}{sep}{step}") not in usual
    ]


def celery_queue_keys(queues: tuple[str, ...] | list[str]) -> list[str]:
    """The Redis lists that hold the messages of these Celery queues, in kombu's order."""
    return [
        name if step == 0 else f"{name}{KOMBU_PRIORITY_SEPARATOR}{step}"
        for name in queues
        for step in KOMBU_PRIORITY_STEPS
    ]


@dataclass(frozen=True)
class FairKeys:
    """The keys of the fair intake and the fleet-wide limits, under `<prefix>:fair`."""

    prefix: str

    def _k(self, name: str) -> str:
        return f"{self.prefix}:fair:{name}"

    # --- the jobs ---
    @property
    def intake(self) -> str:
        """Messages taken from the Celery queue by the dispatcher's blocking wait, to be read."""
        return self._k("intake")

    @property
    def delayed(self) -> str:
        """Messages with a countdown or ETA, scored by their due time (epoch seconds)."""
        return self._k("delayed")

    def queue_prefix(self, klass: str) -> str:
        """The per-account lists of one priority class: this prefix plus the account label."""
        return self._k(f"q:{klass}/")

    def queue(self, klass: str, account: str) -> str:
        return self.queue_prefix(klass) + account

    def active(self, klass: str) -> str:
        """The accounts that have jobs waiting in a class (a set)."""
        return self._k(f"active:{klass}")

    def ring(self, klass: str) -> str:
        """The round-robin order of those accounts (a list)."""
        return self._k(f"ring:{klass}")

    def credit(self, klass: str) -> str:
        """Deficit round-robin credit left per account (a hash)."""
        return self._k(f"credit:{klass}")

    @property
    def intakes(self) -> str:
        """What each live worker process would read: its queues (-Q), its tasks and which of
        them call Runware (worker id -> JSON); the dispatcher serves the union."""
        return self._k("workers:intake")

    @property
    def rejected(self) -> str:
        """Messages set aside by the dispatcher's step, that no worker could read or whose task
        no worker registers, until the dispatcher files them in the dead letters or parks them
        in `unknown` (a list)."""
        return self._k("rejected")

    @property
    def refused_keys(self) -> str:
        """Fingerprints of the API keys Runware refused (401/403, invalidApiKey) since the
        fleet last resumed: a worker with one of them makes no call (a set)."""
        return self._k("refused_keys")

    @property
    def unknown(self) -> str:
        """Jobs of a task no live worker of the fleet registers, parked until one does or the
        operator moves them (a list, newest first; tasks/unknown.py)."""
        return self._k("unknown")

    @property
    def parked(self) -> str:
        """Accounts of either class out of the round-robin while their own rate holds them back
        (member: class letter and account, "i:team-a"; score: when they may call again)."""
        return self._k("parked")

    @property
    def streak(self) -> str:
        """Interactive grants in a row."""
        return self._k("streak")

    @property
    def ready(self) -> str:
        """The Celery queue the worker threads consume: granted jobs only."""
        return f"{self.prefix}.ready"

    @property
    def transit(self) -> str:
        """Granted messages a worker has not taken custody of yet (delivery tag -> message)."""
        return self._k("transit")

    @property
    def transit_at(self) -> str:
        """Where each of those stands in the ready queue (delivery tag -> the number of the push
        that put it there, counted by `ready_pushed`)."""
        return self._k("transit:seq")

    @property
    def transit_legacy(self) -> str:
        """Transit records written by an earlier version (delivery tag -> epoch seconds), moved
        to `transit_at` a few per step after an upgrade."""
        return self._k("transit:at")

    @property
    def transit_left(self) -> str:
        """Records whose message has left the ready queue with no worker's custody write seen
        yet (delivery tag -> when the message counts as lost)."""
        return self._k("transit:left")

    @property
    def ready_pushed(self) -> str:
        """How many messages the dispatcher has pushed onto the ready queue, ever: with the
        queue's length, how many of them workers have taken, so a record's place needs no scan."""
        return self._k("ready:pushed")

    # --- the limits ---
    @property
    def tat(self) -> str:
        """The fleet's GCRA timeline (theoretical arrival time of the next call)."""
        return self._k("tat")

    @property
    def cooldown(self) -> str:
        return self._k("cooldown")

    @property
    def strikes(self) -> str:
        return self._k("strikes")

    @property
    def overrides(self) -> str:
        """Run-time overrides of the fleet's limits (a hash: rate, burst, max_in_flight)."""
        return self._k("overrides")

    @property
    def leases(self) -> str:
        """Granted jobs not yet acknowledged, by delivery tag, scored by expiry: each holds an
        in-flight slot and a worker thread."""
        return self._k("leases")

    @property
    def busy(self) -> str:
        """Jobs passed to the ready queue without a grant (tasks that do not call Runware), by
        delivery tag, scored by expiry: each holds a worker thread until acknowledged."""
        return self._k("busy")

    @property
    def account_rate(self) -> str:
        """Per-account rate overrides (a hash: account -> calls per second)."""
        return self._k("acct:rate")

    @property
    def account_weight(self) -> str:
        """Per-account weights (a hash: account -> integer >= 1)."""
        return self._k("acct:weight")

    @property
    def account_tat(self) -> str:
        """Per-account GCRA timelines (a sorted set: account -> epoch seconds); one past by a
        second is removed. (Named anew: the former `acct:tat` hash expires by itself.)"""
        return self._k("acct:timeline")

    @property
    def accounts(self) -> str:
        """Accounts with an override (a set), for `enhance-worker limits show`."""
        return self._k("accounts")

    # --- the fleet ---
    @property
    def workers(self) -> str:
        """Live worker processes and their threads (a hash: worker id -> threads)."""
        return self._k("workers")

    @property
    def workers_seen(self) -> str:
        """When each worker's registration expires (worker id -> epoch seconds)."""
        return self._k("workers:seen")

    @property
    def wake(self) -> str:
        """Pushed when a slot frees, so that a waiting dispatcher looks again at once."""
        return self._k("wake")

    @property
    def parked_polls(self) -> str:
        """Delayed messages that continue a call under way (a poll), by task id: a webhook's
        arrival makes one due at once."""
        return self._k("parked-polls")

    def hook_woken(self, task_id: str) -> str:
        """Set when a webhook woke the job: it is woken once."""
        return self._k(f"hook-woken:{task_id}")

    @property
    def hooked(self) -> str:
        """Task ids whose webhook brought their result (zset, scored by expiry): their next
        run reads it and makes no call, so it passes without a grant."""
        return self._k("hooked")

    @property
    def dispatcher(self) -> str:
        """The lock naming the fleet's one dispatcher."""
        return self._k("dispatcher")


@dataclass(frozen=True)
class StateKeys:
    """Keys in the state Redis (LIMITER_REDIS_URL): the ledger, poll markers, dead letters."""

    prefix: str

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"

    def pending(self, task_uuid: str) -> str:
        """A submitted asynchronous task's submission time (it is being polled)."""
        return f"{self.prefix}:pending:{task_uuid}"

    def alone(self, task_uuid: str) -> str:
        """Set when the task's next call must go in a request of its own."""
        return f"{self.prefix}:pending:alone:{task_uuid}"

    def hook_items(self, task_uuid: str) -> str:
        """The items Runware's webhooks brought for an async call (hash: item id -> JSON)."""
        return f"{self.prefix}:hook:{task_uuid}"

    @property
    def hooks_awaited(self) -> str:
        """Async calls that expect a webhook (zset: taskUUID -> when submitted)."""
        return f"{self.prefix}:hook:awaited"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}:ledger"

    def record(self, task_uuid: str) -> str:
        """A finished call: its recorded cost and its items."""
        return f"{self.ledger}:task:{task_uuid}"

    def day(self, day: str) -> str:
        """One UTC day's cost totals (ledger_lib.lua builds this name too)."""
        return f"{self.ledger}:day:{day}"

    @property
    def reservations(self) -> str:
        return f"{self.ledger}:resv"

    @property
    def reservations_due(self) -> str:
        return f"{self.ledger}:resv:due"

    @property
    def reservations_checked(self) -> str:
        """Unsettled reservations a reconciliation check is under way for, until when."""
        return f"{self.ledger}:resv:checking"

    @property
    def reserved_sums(self) -> str:
        return f"{self.ledger}:resv:sum"

    def estimates(self, day: str) -> str:
        """The highest real cost per call shape seen on one UTC day."""
        return f"{self.ledger}:est:{day}"

    @property
    def budgets(self) -> str:
        """Daily budgets of accounts set at run time (account -> micro-USD, -1: none), which
        win over RUNWARE_ACCOUNT_DAILY_BUDGET_USD (a hash)."""
        return f"{self.ledger}:budgets"
