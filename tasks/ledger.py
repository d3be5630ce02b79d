"""The cost ledger and the daily budgets, in Redis, shared by every worker.

Money is integer micro-dollars (1 USD = 1,000,000), never summed floats.

- `commit` records a taskUUID's real cost exactly once (a redelivered or retried task that
  commits again changes nothing) into the totals of its UTC day, overall and per account.
- `reserve` is the budget gate before a call: it atomically checks today's spend plus what other
  running tasks have reserved against RUNWARE_DAILY_BUDGET_USD and
  RUNWARE_ACCOUNT_DAILY_BUDGET_USD, and reserves this task's estimate, or raises BudgetExceeded.
  A reservation is replaced by the real cost at commit, dropped by `release`, and expires after
  RUNWARE_RESERVATION_S if its task died, so a crash never blocks a budget for good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from redis.commands.core import Script

from config.keys import StateKeys
from config.settings import Settings, get_settings
from tasks import metrics
from tasks.errors import BudgetExceeded
from tasks.scripts import run as run_script
from tasks.state import hold_through_outage, per_process, redis_client

MICRO = 1_000_000
TASK_TTL_S = 8 * 86_400  # how long "this taskUUID is billed" is remembered
DAY_TTL_S = 400 * 86_400  # how long daily totals are kept

# KEYS: 1 billed marker of the task, 2 today's totals, 3 reservation expiries (zset),
#       4 reservation amounts (hash uuid -> "micro|account"), 5 reserved sums (hash)
_PURGE = """
-- A sum that reaches zero is removed, so accounts seen once leave no field behind.
local function decrease(field, amount)
  if redis.call('HINCRBY', KEYS[5], field, -amount) <= 0 then redis.call('HDEL', KEYS[5], field) end
end
local function unreserve(uuid)
  local entry = redis.call('HGET', KEYS[4], uuid)
  if entry then
    local sep = string.find(entry, '|', 1, true)
    local amount = tonumber(string.sub(entry, 1, sep - 1))
    local account = string.sub(entry, sep + 1)
    decrease('total', amount)
    decrease('acct:' .. account, amount)
    redis.call('HDEL', KEYS[4], uuid)
  end
  redis.call('ZREM', KEYS[3], uuid)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- Every expired reservation goes before a budget is checked (each is purged once, so the work
-- is paid for by the jobs that made them): a budget must never refuse on money no one holds.
repeat
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 500)
  for _, uuid in ipairs(expired) do unreserve(uuid) end
until #expired < 500
"""

# ARGV: 1 uuid, 2 account, 3 estimate micro, 4 fleet budget micro (-1: none),
#       5 account budget micro (-1: none), 6 reservation seconds
# Returns {1, 0, 0} reserved, {2, 0, 0} already billed, {0, 1|2, spent} refused by the fleet's
# or the account's budget.
_RESERVE_FN = """
local function reserve()
  if redis.call('EXISTS', KEYS[1]) == 1 then return {2, 0, 0} end
  local uuid, account, estimate = ARGV[1], ARGV[2], tonumber(ARGV[3])
  if redis.call('HEXISTS', KEYS[4], uuid) == 1 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), uuid)
    return {1, 0, 0}
  end
  local fleet_budget, account_budget = tonumber(ARGV[4]), tonumber(ARGV[5])
  if fleet_budget >= 0 then
    local spent = tonumber(redis.call('HGET', KEYS[2], 'total') or '0')
        + tonumber(redis.call('HGET', KEYS[5], 'total') or '0')
    if spent + estimate > fleet_budget then return {0, 1, spent} end
  end
  if account_budget >= 0 then
    local spent = tonumber(redis.call('HGET', KEYS[2], 'acct:' .. account) or '0')
        + tonumber(redis.call('HGET', KEYS[5], 'acct:' .. account) or '0')
    if spent + estimate > account_budget then return {0, 2, spent} end
  end
  redis.call('HSET', KEYS[4], uuid, estimate .. '|' .. account)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), uuid)
  redis.call('HINCRBY', KEYS[5], 'total', estimate)
  redis.call('HINCRBY', KEYS[5], 'acct:' .. account, estimate)
  return {1, 0, 0}
end
"""
RESERVE = _PURGE + _RESERVE_FN + "return reserve()"

# A call's start in one round trip. KEYS 6: the finished items of the task, 7: its submission
# marker. Returns {3, items} when the task already finished (nothing reserved); else the
# reservation's answer, with the submission time (or '') in place of 0 when it went through.
BEGIN = (
    _PURGE
    + _RESERVE_FN
    + """
local done = redis.call('GET', KEYS[6])
if done then return {3, done, 0} end
local answer = reserve()
if answer[1] == 0 then return answer end
return {answer[1], redis.call('GET', KEYS[7]) or '', 0}
"""
)

# ARGV: 1 uuid, 2 account, 3 cost micro, 4 task ttl, 5 day ttl
_COMMIT_FN = """
local function commit()
  unreserve(ARGV[1])
  if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', tonumber(ARGV[4])) then
    local cost, account = tonumber(ARGV[3]), ARGV[2]
    redis.call('HINCRBY', KEYS[2], 'total', cost)
    redis.call('HINCRBY', KEYS[2], 'tasks', 1)
    redis.call('HINCRBY', KEYS[2], 'acct:' .. account, cost)
    redis.call('HINCRBY', KEYS[2], 'acct_tasks:' .. account, 1)
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
    return 1
  end
  return 0
end
"""
COMMIT = _PURGE + _COMMIT_FN + "return commit()"

# A call's end in one round trip: commit, keep the items (ARGV 6) for ARGV 7 seconds, drop the
# submission marker.
END = (
    _PURGE
    + _COMMIT_FN
    + """
local recorded = commit()
redis.call('SET', KEYS[6], ARGV[6], 'EX', tonumber(ARGV[7]))
redis.call('DEL', KEYS[7])
return recorded
"""
)

RELEASE = (
    _PURGE
    + """
unreserve(ARGV[1])
return 1
"""
)


def to_micro(usd: float) -> int:
    """USD as integer micro-dollars, rounded to the nearest."""
    return round(usd * MICRO)


_today: tuple[int, str] = (-1, "")


def utc_day(moment: datetime | None = None) -> str:
    """The UTC date as YYYY-MM-DD (of `moment`, default now; today's is formatted once a day)."""
    global _today
    if moment is not None:
        return moment.strftime("%Y-%m-%d")
    number = int(time.time() // 86400)
    if _today[0] != number:
        _today = (number, datetime.fromtimestamp(number * 86400, UTC).strftime("%Y-%m-%d"))
    return _today[1]


@dataclass(frozen=True)
class DayTotals:
    """What one UTC day cost, overall and per account."""

    day: str
    total_micro: int
    tasks: int
    by_account_micro: dict[str, int]
    tasks_by_account: dict[str, int]

    def as_json(self, account: str | None = None) -> dict[str, Any]:
        """The `enhance-worker cost --json` form."""
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
    """Costs and budget reservations in Redis."""

    def __init__(self, client: redis.Redis, settings: Settings, outage_s: float = 30.0) -> None:
        self.redis = client
        self.settings = settings
        self.outage_s = outage_s
        self.prefix = StateKeys(settings.key_prefix).ledger
        self._reserve = client.register_script(RESERVE)
        self._commit = client.register_script(COMMIT)
        self._release = client.register_script(RELEASE)
        self._begin = client.register_script(BEGIN)
        self._end = client.register_script(END)

    def _keys(self, task_uuid: str, day: str | None = None) -> list[str]:
        p = self.prefix
        return [
            f"{p}:task:{task_uuid}",
            f"{p}:day:{day or utc_day()}",
            f"{p}:resv:expiry",
            f"{p}:resv:amount",
            f"{p}:resv:sum",
        ]

    def _reserve_args(
        self, task_uuid: str, account: str, estimate_usd: float
    ) -> list[str | int | float]:
        settings = self.settings
        fleet = settings.runware_daily_budget_usd
        per_account = settings.runware_account_daily_budget_usd
        return [
            task_uuid,
            account,
            to_micro(estimate_usd),
            -1 if fleet is None else to_micro(fleet),
            -1 if per_account is None else to_micro(per_account),
            settings.runware_reservation_s,
        ]

    def _refusal(
        self, which: int, spent: int, task_uuid: str, account: str, estimate_usd: float
    ) -> BudgetExceeded:
        settings = self.settings
        if which == 1:
            name, limit, scope = (
                "RUNWARE_DAILY_BUDGET_USD",
                settings.runware_daily_budget_usd,
                "the fleet",
            )
        else:
            name, limit, scope = (
                "RUNWARE_ACCOUNT_DAILY_BUDGET_USD",
                settings.runware_account_daily_budget_usd,
                f"account {account!r}",
            )
        return BudgetExceeded(
            f"daily budget {name} of ${limit or 0:.6f} for {scope} would be exceeded: "
            f"${spent / MICRO:.6f} already spent or reserved today (UTC), and task "
            f"{task_uuid} needs ${estimate_usd:.6f}; no call was made"
        )

    def reserve(self, task_uuid: str, account: str, estimate_usd: float) -> bool:
        """Reserve `estimate_usd` for this task under the budgets; False when the taskUUID is
        already billed (nothing to reserve). Raises BudgetExceeded naming the budget."""
        args = self._reserve_args(task_uuid, account, estimate_usd)
        status, which, spent = hold_through_outage(
            lambda: self._reserve(keys=self._keys(task_uuid), args=args), "ledger", self.outage_s
        )
        if int(status) == 0:
            raise self._refusal(int(which), int(spent), task_uuid, account, estimate_usd)
        return int(status) == 1

    def begin(
        self, task_uuid: str, account: str, estimate_usd: float, done_key: str, marker_key: str
    ) -> tuple[str, bytes | None]:
        """A call's start, in one round trip: ("done", items JSON) if the task already
        finished; else reserve under the budgets (or raise BudgetExceeded) and return
        ("go", the submission marker or None)."""
        keys, args = self.begin_keys_args(task_uuid, account, estimate_usd, done_key, marker_key)
        answer = hold_through_outage(
            lambda: run_script(self._begin, keys, args), "ledger", self.outage_s
        )
        return self.begin_answer(answer, task_uuid, account, estimate_usd)

    def begin_keys_args(
        self, task_uuid: str, account: str, estimate_usd: float, done_key: str, marker_key: str
    ) -> tuple[list[str], list[str | int | float]]:
        """The KEYS and ARGV of the BEGIN script for this call."""
        keys = [*self._keys(task_uuid), done_key, marker_key]
        return keys, self._reserve_args(task_uuid, account, estimate_usd)

    def begin_answer(
        self, answer: list[Any], task_uuid: str, account: str, estimate_usd: float
    ) -> tuple[str, bytes | None]:
        """What BEGIN's reply means: ("done", items) or ("go", marker); BudgetExceeded raised."""
        status, value, spent = answer[0], answer[1], answer[2]
        if int(status) == 3:
            return "done", value
        if int(status) == 0:
            raise self._refusal(int(value), int(spent), task_uuid, account, estimate_usd)
        return "go", value or None

    def end(
        self,
        task_uuid: str,
        account: str,
        cost_usd: float,
        done_key: str,
        marker_key: str,
        items_json: str,
        keep_s: int,
    ) -> bool:
        """A call's end, in one round trip: record the cost once, keep the finished items for
        `keep_s` seconds, drop the submission marker. True if this call recorded the cost."""
        keys = [*self._keys(task_uuid), done_key, marker_key]
        args = [*self._commit_args(task_uuid, account, cost_usd), items_json, keep_s]
        return self._record(self._end, keys, args, account, cost_usd)

    def commit(self, task_uuid: str, account: str, cost_usd: float) -> bool:
        """Record the real cost once; True if this call recorded it, False if it already was."""
        args = self._commit_args(task_uuid, account, cost_usd)
        return self._record(self._commit, self._keys(task_uuid), args, account, cost_usd)

    def _commit_args(
        self, task_uuid: str, account: str, cost_usd: float
    ) -> list[str | int | float]:
        return [task_uuid, account, to_micro(cost_usd), TASK_TTL_S, DAY_TTL_S]

    def _record(
        self,
        script: Script,
        keys: list[str],
        args: list[str | int | float],
        account: str,
        cost_usd: float,
    ) -> bool:
        """Run a script that records a cost once; count it in the metrics if this one did."""
        recorded = hold_through_outage(
            lambda: run_script(script, keys, args), "ledger", self.outage_s
        )
        if int(recorded):
            metrics.SPENT.labels(account).inc(to_micro(cost_usd) / MICRO)
        return bool(int(recorded))

    def release(self, task_uuid: str) -> None:
        """Drop this task's reservation (the call did not happen or was not billed)."""
        self._release(keys=self._keys(task_uuid), args=[task_uuid])

    def billed(self, task_uuid: str) -> float | None:
        """The recorded cost of a taskUUID in USD, or None if it is not billed."""
        raw = self.redis.get(f"{self.prefix}:task:{task_uuid}")
        return None if raw is None else int(raw) / MICRO

    def day(self, day: str | None = None) -> DayTotals:
        """The totals of one UTC day (default today)."""
        name = day or utc_day()
        raw = self.redis.hgetall(f"{self.prefix}:day:{name}")
        values = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
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
