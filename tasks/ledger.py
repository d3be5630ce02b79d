"""The cost ledger and the daily budgets, in Redis, shared by every worker.

Money is integer micro-dollars (1 USD = 1,000,000), never summed floats. The scripts are
tasks/lua/ledger_*.lua.

- `begin` is a call's start: a task that already finished gets its items back (no call); else
  today's spend plus every reservation is checked against RUNWARE_DAILY_BUDGET_USD and
  RUNWARE_ACCOUNT_DAILY_BUDGET_USD and the call's estimate is reserved, or BudgetExceeded names
  the budget. The estimate is the configured one, or the highest real cost of the same call
  shape (task type, model, size, steps, results, duration, versions) seen today or yesterday,
  whichever is higher.
- `end` replaces the reservation with the real cost, recorded once per taskUUID on the day the
  reservation was made. The items are kept for RUNWARE_ITEMS_RETENTION_S (a job that comes back
  gets them without a call); a small billed-once marker per taskUUID, for
  RUNWARE_BILLED_RETENTION_S, keeps a resend from counting the cost twice.
- A reservation never lapses by time. A job that stops following its call (killed worker,
  TaskTimeout, retries run out) leaves it *unsettled*: `give_up` makes it due at once, and one
  whose job shows no sign of life for RUNWARE_RESERVATION_S becomes due by itself. The
  reconciler (tasks/reconcile.py) asks Runware about each due one with getResponse: a finished
  call is recorded (`end`), one Runware never accepted is dropped (`release`), a running one
  waits for the next period. Until then it counts against the budgets at its estimate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from redis.commands.core import Script

from config.keys import StateKeys
from config.settings import Settings, get_settings
from tasks import metrics
from tasks.errors import BUDGET_UNSETTLED, BudgetExceeded, TransientError
from tasks.scripts import register
from tasks.scripts import run as run_script
from tasks.state import hold_through_outage, per_process, redis_client, text
from tasks.state import seconds as redis_seconds

logger = logging.getLogger(__name__)

MICRO = 1_000_000
DAY_S = 86_400
# Retentions: a finished call's items (RUNWARE_ITEMS_RETENTION_S), its billed-once marker
# (RUNWARE_BILLED_RETENTION_S) and the daily totals (RUNWARE_DAY_TOTALS_RETENTION_DAYS) are
# settings; a day's highest cost per call shape is read today and tomorrow, then goes.
ESTIMATE_TTL_S = 3 * DAY_S
Arg = str | bytes | int | float  # a script's argument
# The request fields a price depends on; with the task type and the model they make a shape.
PRICE_FIELDS = ("width", "height", "steps", "numberResults", "promptVersions", "duration", "fps")


def to_micro(usd: float) -> int:
    """USD as integer micro-dollars, rounded to the nearest."""
    return round(usd * MICRO)


_UUID_FORM = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def marker_field(task_uuid: str) -> bytes:
    """The field of a taskUUID's billed-once marker (tasks/lua/ledger_lib.lua): a UUID's 16 bytes
    (in any case), any other taskUUID as it is. Markers written by earlier versions, which made
    it in Lua, have the same field."""
    if _UUID_FORM.fullmatch(task_uuid):
        return bytes.fromhex(task_uuid.replace("-", ""))
    return task_uuid.encode()


def call_shape(body: dict[str, Any]) -> str:
    """What a call's price depends on, as one string: `imageInference runware:101@1
    height=512 numberResults=1 width=512` (the fields present in the task object)."""
    fields = " ".join(f"{name}={body[name]}" for name in sorted(PRICE_FIELDS) if name in body)
    return f"{body.get('taskType', '?')} {body.get('model', '?')} {fields}".strip()


_today: tuple[int, str] = (-1, "")
_holder: list[str] = [""]  # this worker process's id in the fleet's heartbeats (tasks/dispatcher)


def set_holder(worker: str) -> None:
    """Name the worker process whose calls this process makes (set before the pool forks, so
    that a prefork child names its parent): a reservation records it, and the reconciler does
    not wait for a reservation whose holder has stopped heartbeating."""
    _holder[0] = worker


def utc_day(moment: datetime | None = None) -> str:
    """The UTC date as YYYY-MM-DD (of `moment`, default now; today's is formatted once a day)."""
    global _today
    if moment is not None:
        return moment.strftime("%Y-%m-%d")
    number = int(time.time() // DAY_S)
    if _today[0] != number:
        _today = (number, datetime.fromtimestamp(number * DAY_S, UTC).strftime("%Y-%m-%d"))
    return _today[1]


def _yesterday() -> str:
    return utc_day(datetime.fromtimestamp(time.time() - DAY_S, UTC))


@dataclass(frozen=True)
class Started:
    """What `begin` found: the items of a call that already finished, or a reserved call to
    make (`submitted`: when an async task was submitted, so it is polled, not sent)."""

    finished: list[dict[str, Any]] | None = None
    submitted: float | None = None
    alone: bool = False  # its last request was refused without naming a task: send it alone
    estimate_micro: int = 0
    now: float = 0.0  # Redis's clock at the start (hosts' own clocks may disagree)


@dataclass(frozen=True)
class Reservation:
    """Money held for one call whose outcome is not recorded yet."""

    task_uuid: str
    account: str
    estimate_micro: int
    day: str
    shape: str
    due: float  # when it is (or was) due for reconciliation
    started: float | None  # when the call first reserved (epoch seconds)

    @classmethod
    def parse(cls, task_uuid: str, raw: bytes | str, due: float) -> Reservation:
        entry = json.loads(raw)
        return cls(
            task_uuid,
            entry["a"],
            int(entry["e"]),
            entry["d"],
            entry.get("s", ""),
            due,
            entry.get("t"),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "taskUUID": self.task_uuid,
            "account": self.account,
            "estimate_usd": self.estimate_micro / MICRO,
            "day": self.day,
            "shape": self.shape,
        }


@dataclass(frozen=True)
class Holdings:
    """Every reservation now: those of calls in progress, and the unsettled ones (due)."""

    in_flight: list[Reservation] = field(default_factory=list)
    unsettled: list[Reservation] = field(default_factory=list)

    def as_json(self, limit: int = 100) -> dict[str, Any]:
        def usd(items: list[Reservation]) -> float:
            return sum(r.estimate_micro for r in items) / MICRO

        oldest = sorted(self.unsettled, key=lambda r: r.due)[:limit]
        return {
            "reserved_calls": len(self.in_flight),
            "reserved_usd": usd(self.in_flight),
            "unsettled_calls": len(self.unsettled),
            "unsettled_usd": usd(self.unsettled),
            "unsettled": [r.as_json() for r in oldest],
        }


@dataclass(frozen=True)
class DayTotals:
    """What one UTC day cost, overall and per account."""

    day: str
    total_micro: int
    tasks: int
    by_account_micro: dict[str, int]
    tasks_by_account: dict[str, int]

    def as_json(self, account: str | None = None) -> dict[str, Any]:
        """The settled part of `enhance-worker cost --json`."""
        if account is not None:
            micro = self.by_account_micro.get(account, 0)
            return {
                "day": self.day,
                "total_usd": micro / MICRO,
                "tasks": self.tasks_by_account.get(account, 0),
                "by_account": {account: micro / MICRO},
            }
        return {
            "day": self.day,
            "total_usd": self.total_micro / MICRO,
            "tasks": self.tasks,
            "by_account": {k: v / MICRO for k, v in sorted(self.by_account_micro.items())},
        }


class Ledger:
    """Costs, budget reservations and their reconciliation, in Redis."""

    def __init__(self, client: redis.Redis, settings: Settings, outage_s: float = 30.0) -> None:
        self.redis = client
        self.settings = settings
        self.outage_s = outage_s
        self.keys = StateKeys(settings.key_prefix)
        self._begin = register(client, "ledger_begin", after="ledger_lib")
        self._end = register(client, "ledger_end", after="ledger_lib")
        self._release = register(client, "ledger_release", after="ledger_lib")
        self._claim = register(client, "ledger_claim")

    def _common(self, task_uuid: str) -> tuple[list[str], list[Arg]]:
        keys = self.keys
        return (
            [keys.record(task_uuid), keys.reservations, keys.reservations_due, keys.reserved_sums],
            [task_uuid, keys.ledger],
        )

    def _run(self, script: Script, keys: list[str], args: list[Arg]) -> Any:
        return hold_through_outage(lambda: run_script(script, keys, args), "ledger", self.outage_s)

    # --- a call --------------------------------------------------------------------------------
    def begin(self, task_uuid: str, account: str, estimate_usd: float, shape: str) -> Started:
        """A call's start, in one round trip: the items if the task already finished; else the
        reservation under the budgets (BudgetExceeded when it does not fit; a TransientError
        when it would fit once unsettled calls are settled)."""
        settings, day = self.settings, utc_day()
        keys, args = self._common(task_uuid)
        fleet = settings.runware_daily_budget_usd
        per_account = settings.runware_account_daily_budget_usd
        keys += [
            self.keys.day(day),
            self.keys.pending(task_uuid),
            self.keys.alone(task_uuid),
            self.keys.estimates(day),
            self.keys.estimates(_yesterday()),
            self.keys.budgets,
        ]
        args += [
            account,
            to_micro(estimate_usd),
            -1 if fleet is None else to_micro(fleet),
            -1 if per_account is None else to_micro(per_account),
            settings.runware_reservation_s,
            day,
            shape,
            _holder[0],
        ]
        answer = self._run(self._begin, keys, args)
        status = int(answer[0])
        if status == 3:
            _cost, _, items = text(answer[1]).partition("|")
            return Started(finished=json.loads(items or "[]"))
        if status == 0:
            which, spent, estimate, unsettled, complete, budget, own = (int(v) for v in answer[1:8])
            raise self._refusal(
                which, spent, estimate, unsettled, task_uuid, account, budget, bool(own),
                bool(complete),
            )  # fmt: skip
        marker = text(answer[1])
        return Started(
            submitted=float(marker) if marker else None,
            alone=bool(int(answer[2])),
            estimate_micro=int(answer[3]),
            now=float(answer[4]),
        )

    def _refusal(
        self,
        which: int,
        spent: int,
        estimate: int,
        unsettled: int,
        task_uuid: str,
        account: str,
        budget: int,
        own: bool = False,
        complete: bool = True,
    ) -> Exception:
        settings = self.settings
        if which == 1:
            name, scope = "RUNWARE_DAILY_BUDGET_USD", "the fleet"
        elif own:
            name, scope = "(set by `limits set --daily-budget`)", f"account {account!r}"
        else:
            name, scope = "RUNWARE_ACCOUNT_DAILY_BUDGET_USD", f"account {account!r}"
        said = (
            f"daily budget {name} of ${budget / MICRO:.6f} for {scope} would be exceeded: "
            f"${spent / MICRO:.6f} already spent or reserved today (UTC), and task "
            f"{task_uuid} needs ${estimate / MICRO:.6f}"
        )
        if unsettled and spent - unsettled + estimate <= budget:
            # It fits once calls Runware may never have billed are settled: wait for that.
            return TransientError(
                f"{said}, of which {'' if complete else 'at least '}${unsettled / MICRO:.6f} is "
                "unsettled calls being reconciled; no call was made",
                code=BUDGET_UNSETTLED,
                retry_after=settings.runware_reconcile_s,
            )
        metrics.BUDGET_REFUSALS.labels("fleet" if which == 1 else "account").inc()
        return BudgetExceeded(f"{said}; no call was made")

    def end(
        self,
        task_uuid: str,
        account: str,
        cost_usd: float,
        items: list[dict[str, Any]],
        shape: str = "",
    ) -> bool:
        """A call's end, in one round trip: record its real cost once (on its reservation's
        day) with its items, drop its reservation and markers, and learn its shape's price.
        True if this call recorded the cost. `shape` '' takes the reservation's."""
        day = utc_day()
        keys, args = self._common(task_uuid)
        keys += [self.keys.pending(task_uuid), self.keys.alone(task_uuid), self.keys.estimates(day)]
        args += [
            account,
            to_micro(cost_usd),
            json.dumps(items),
            self.settings.runware_items_retention_s,
            self.settings.runware_day_totals_retention_days * DAY_S,
            day,
            shape,
            ESTIMATE_TTL_S,
            self.settings.runware_billed_retention_s,
            marker_field(task_uuid),
        ]
        recorded = bool(int(self._run(self._end, keys, args)))
        if recorded:
            metrics.SPENT.labels(metrics.ACCOUNTS.label(account)).inc(to_micro(cost_usd) / MICRO)
        self._replicate(task_uuid)
        return recorded

    def _replicate(self, task_uuid: str) -> None:
        """With REDIS_WAIT_REPLICAS, hold the job's acknowledgement until that many replicas
        have the recorded cost: a failover that loses the last writes of the old primary can
        then lose the job's acknowledgement (it runs again, and finds its record), never the
        record of a call that will not run again."""
        wanted, timeout_ms = self.settings.redis_wait_replicas, self.settings.redis_wait_timeout_ms
        if not wanted:
            return
        try:
            acknowledged = int(self.redis.wait(wanted, timeout_ms))
        except redis.RedisError as exc:
            acknowledged, why = 0, f"{type(exc).__name__}"
        else:
            why = f"{acknowledged} did within {timeout_ms} ms"
        if acknowledged < wanted:
            logger.warning(
                "The cost of taskUUID %s is not confirmed by %d replica(s) (%s): a failover now "
                "could lose it until the reconciler finds it again.",
                task_uuid,
                wanted,
                why,
            )

    def release(self, task_uuid: str, claimed: float | None = None) -> bool:
        """Drop this task's reservation: Runware refused the call or never had it. With
        `claimed` (the time of the reconciler's claim), only if no run of the job took it up
        since."""
        keys, args = self._common(task_uuid)
        args.append("" if claimed is None else f"{claimed:.6f}")
        return bool(int(self._run(self._release, keys, args)))

    def give_up(self, task_uuid: str) -> None:
        """The job stops following a call Runware may have accepted: its reservation becomes
        unsettled at once (the reconciler settles it). One attempt: if Redis is down, the
        reservation becomes due by itself after RUNWARE_RESERVATION_S."""
        with contextlib.suppress(redis.RedisError):
            now = redis_seconds(self.redis.time())  # Redis's clock, as the claim reads it
            self.redis.zadd(self.keys.reservations_due, {task_uuid: now}, xx=True)

    # --- reconciliation ------------------------------------------------------------------------
    def claim_due(
        self, check_s: float, limit: int = 500, alive: list[str] | None = None
    ) -> list[Reservation]:
        """Take up to `limit` unsettled reservations that no check is under way for, for a
        check with Runware; each stays unsettled, and is not claimed again until its check
        reports (`checked`) or `check_s` seconds pass. Their `due` is the time of the claim.
        `alive`: every live worker process; a reservation any other holds is unsettled now."""
        keys = [
            self.keys.reservations,
            self.keys.reservations_due,
            self.keys.reservations_checked,
        ]
        args: list[Arg] = [check_s, limit, "0" if alive is None else "1"]
        flat = self._run(self._claim, keys, [*args, *(alive or [])])
        return [
            Reservation.parse(text(flat[i]), flat[i + 1], float(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    def checked(self, task_uuid: str) -> None:
        """A check of an unsettled call reported: the call may be claimed again (if it is
        still unsettled, at the next period)."""
        checking = self.keys.reservations_checked
        hold_through_outage(lambda: self.redis.zrem(checking, task_uuid), "ledger", self.outage_s)

    def holdings(self, account: str | None = None) -> Holdings:
        """Every reservation now, split into calls in progress and unsettled ones."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.reservations)
            pipe.zrange(self.keys.reservations_due, 0, -1, withscores=True)
            pipe.time()
            raw, scores, clock = pipe.execute()
        due = {text(k): float(v) for k, v in scores}
        now = redis_seconds(clock)
        held = Holdings()
        for key, value in raw.items():
            task_uuid = text(key)
            reservation = Reservation.parse(task_uuid, value, due.get(task_uuid, now))
            if account is not None and reservation.account != account:
                continue
            (held.unsettled if reservation.due <= now else held.in_flight).append(reservation)
        return held

    def estimates(self) -> dict[str, float]:
        """The learned estimate (USD) of every call shape seen today or yesterday."""
        seen: dict[str, int] = {}
        for day in (_yesterday(), utc_day()):
            for shape, micro in self.redis.hgetall(self.keys.estimates(day)).items():
                name = text(shape)
                seen[name] = max(seen.get(name, 0), int(micro))
        return {shape: micro / MICRO for shape, micro in sorted(seen.items())}

    # --- budgets of accounts set at run time ----------------------------------------------------
    def set_budget(self, account: str, usd: float | None) -> None:
        """The account's daily budget from now on, across the fleet (None: no budget at all,
        whatever RUNWARE_ACCOUNT_DAILY_BUDGET_USD says)."""
        if usd is not None and not usd >= 0:
            raise ValueError(f"a daily budget is a number of USD >= 0 (got {usd})")
        self.redis.hset(self.keys.budgets, account, -1 if usd is None else to_micro(usd))

    def clear_budget(self, account: str) -> bool:
        """The account goes back to RUNWARE_ACCOUNT_DAILY_BUDGET_USD; whether it had its own."""
        return bool(self.redis.hdel(self.keys.budgets, account))

    def budgets(self) -> dict[str, float | None]:
        """The accounts' budgets set at run time (None: no budget)."""
        return {
            text(k): (None if int(v) < 0 else int(v) / MICRO)
            for k, v in sorted(self.redis.hgetall(self.keys.budgets).items())
        }

    def budget_report(self, totals: DayTotals, account: str | None = None) -> dict[str, Any]:
        """Each budget with what is spent (settled and reserved) and what is left today: the
        fleet's, the default per account, and every account with a budget of its own (or the
        one asked for). Reserved: the sums the budget check itself reads (ledger_begin.lua)."""
        held = {text(k): int(v) for k, v in self.redis.hgetall(self.keys.reserved_sums).items()}

        def row(budget: float | None, spent_micro: int, source: str) -> dict[str, Any]:
            spent = spent_micro / MICRO
            left = None if budget is None else max(0.0, budget - spent)
            return {"budget_usd": budget, "spent_usd": spent, "left_usd": left, "source": source}

        settings = self.settings
        fleet_spent = totals.total_micro + held.get("total", 0)
        own = self.budgets()
        names = sorted(set(own) | ({account} if account else set()))
        default = settings.runware_account_daily_budget_usd
        return {
            "fleet": row(
                settings.runware_daily_budget_usd, fleet_spent, "RUNWARE_DAILY_BUDGET_USD"
            ),
            "account_default_usd": default,
            "accounts": {
                name: row(
                    own.get(name, default),
                    totals.by_account_micro.get(name, 0) + held.get(f"acct:{name}", 0),
                    "run time" if name in own else "RUNWARE_ACCOUNT_DAILY_BUDGET_USD",
                )
                for name in names
            },
        }

    # --- reading -------------------------------------------------------------------------------
    def day(self, day: str | None = None) -> DayTotals:
        """The settled totals of one UTC day (default today)."""
        name = day or utc_day()
        raw = self.redis.hgetall(self.keys.day(name))
        values = {text(k): int(v) for k, v in raw.items()}
        return DayTotals(
            day=name,
            total_micro=values.get("total", 0),
            tasks=values.get("tasks", 0),
            by_account_micro={
                k.removeprefix("acct:"): v for k, v in values.items() if k.startswith("acct:")
            },
            tasks_by_account={
                k.removeprefix("acct_tasks:"): v
                for k, v in values.items()
                if k.startswith("acct_tasks:")
            },
        )


def _make_ledger() -> Ledger:
    settings = get_settings()
    return Ledger(redis_client(settings), settings)


get_ledger = per_process(_make_ledger)  # this process's Ledger
