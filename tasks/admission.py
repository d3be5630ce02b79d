"""A call's start in one round trip: the ledger's BEGIN and the limiter's first ask (ENQUEUE)
composed into one Lua script, so a job pays one Redis round trip before it calls Runware
instead of two.

The two scripts are kept as they are (tasks/ledger.py, tasks/fairness.py) and wrapped as Lua
functions of their own KEYS and ARGV. The limiter is asked only when the ledger says go: a
finished task or a refused budget takes no place in the limits. The answer's place (granted at
once, or queued for the dispatcher) travels with the call to the limiter's slot; a call that
ends before using it gives it back (Limiter.forfeit).
"""

from __future__ import annotations

import logging
from typing import Any

from tasks import fairness
from tasks.ledger import BEGIN, Ledger, get_ledger
from tasks.limiter import Admission, Limiter, get_limiter
from tasks.state import hold_through_outage, per_process, run_script

logger = logging.getLogger(__name__)


def _as_function(name: str, source: str) -> str:
    return f"local function {name}(KEYS, ARGV)\n{source}\nend\n"


# ARGV 1: how many of the rest are BEGIN's; then BEGIN's ARGV, then ENQUEUE's. KEYS: BEGIN's.
# Returns BEGIN's answer, plus ENQUEUE's {status, needs_release} when the ledger said go.
BEGIN_AND_ENQUEUE = (
    _as_function("ledger_begin", BEGIN)
    + _as_function("limiter_enqueue", fairness.ENQUEUE)
    + """
local n = tonumber(ARGV[1])
local begin_args, enqueue_args = {}, {}
for i = 2, n + 1 do begin_args[#begin_args + 1] = ARGV[i] end
for i = n + 2, #ARGV do enqueue_args[#enqueue_args + 1] = ARGV[i] end
local answer = ledger_begin(KEYS, begin_args)
if answer[1] == 3 or answer[1] == 0 then return answer end
local place = limiter_enqueue({}, enqueue_args)
return {answer[1], answer[2], answer[3], place[1], place[2]}
"""
)


class CallStart:
    """Starts calls for one process: budget, result cache and the limits, in one script."""

    def __init__(self, ledger: Ledger, limiter: Limiter) -> None:
        self.ledger = ledger
        self.limiter = limiter
        self._script = ledger.redis.register_script(BEGIN_AND_ENQUEUE)

    def begin(
        self,
        task_uuid: str,
        account: str,
        priority: str,
        estimate_usd: float,
        done_key: str,
        marker_key: str,
    ) -> tuple[str, bytes | None, Admission]:
        """Ledger.begin's answer, and the call's place in the limits (asked for when the
        ledger said go; else not asked, status 0)."""
        admitted = self.limiter.admission(account, priority)
        keys, begin_args = self.ledger.begin_keys_args(
            task_uuid, account, estimate_usd, done_key, marker_key
        )
        args: list[Any] = [len(begin_args), *begin_args, *admitted.args]
        answer = hold_through_outage(
            lambda: run_script(self._script, keys, args), "ledger", self.ledger.outage_s
        )
        state, value = self.ledger.begin_answer(answer, task_uuid, account, estimate_usd)
        if len(answer) == 5:
            admitted.status, admitted.needs_release = int(answer[3]), bool(int(answer[4]))
        return state, value, admitted

    def forfeit(self, admitted: Admission) -> None:
        """Give back a place the call never used; the limits expire it anyway if this fails."""
        try:
            self.limiter.forfeit(admitted)
        except Exception as exc:  # never hide the call's own outcome behind this
            logger.warning("Could not give back an unused call slot: %s", exc)


get_call_start = per_process(lambda: CallStart(get_ledger(), get_limiter()))
