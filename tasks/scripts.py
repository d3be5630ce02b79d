"""The Lua scripts of tasks/lua/, one per file, each with a header listing its KEYS, ARGV and
what it returns; loaded once and registered on a client. Return codes have names here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).with_name("lua")


# The dispatcher's step: one script, these files joined in order (pump.lua's header says what
# each holds), so that each reads at one sitting and the step stays atomic.
PUMP = ("pump_lib", "pump", "pump_recover", "pump_intake", "pump_fair", "pump_grant")


class Pump(IntEnum):
    """The step's `code`."""

    OK = 1
    NOT_DISPATCHER = -3


class Wait(IntEnum):
    """The step's `wait` when it is not a number of seconds to wait."""

    NOW = 0  # more may be due at once
    NOBODY_WAITS = -1
    NO_FREE_SLOT = -2  # the in-flight cap or every worker thread is taken


@dataclass(frozen=True)
class Grant:
    """A job the step handed to the ready queue."""

    account: str
    klass: str  # i | b
    waited: float  # seconds since it entered the intake
    task_id: str


@dataclass(frozen=True)
class PumpReply:
    """What one step says, read by name from the script's name/value pairs."""

    code: int
    wait: float = 0.0
    granted: int = 0
    read: int = 0
    recovered: int = 0
    due_in: float = -1.0
    rejected: int = 0
    unread: int = 0
    grants: tuple[Grant, ...] = ()

    @classmethod
    def of(cls, reply: Sequence[Any]) -> PumpReply:
        named = {bytes(reply[i]).decode(): reply[i + 1] for i in range(0, len(reply), 2)}
        flat = [bytes(value).decode() for value in named.get("grants", [])]
        return cls(
            code=int(named["code"]),
            wait=float(named.get("wait", 0)),
            granted=int(named.get("granted", 0)),
            read=int(named.get("read", 0)),
            recovered=int(named.get("recovered", 0)),
            due_in=float(named.get("due_in", -1)),
            rejected=int(named.get("rejected", 0)),
            unread=int(named.get("unread", 0)),
            grants=tuple(
                Grant(flat[i], flat[i + 1], float(flat[i + 2]), flat[i + 3])
                for i in range(0, len(flat), 4)
            ),
        )


@cache
def source(name: str) -> str:
    """The text of tasks/lua/NAME.lua."""
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def declared(name: str, listing: str) -> tuple[str, ...]:
    """The quoted names of `local LISTING = {...}` in tasks/lua/NAME.lua, in order: the names
    under which a script takes its KEYS or ARGV (pump.lua's KEY_NAMES and ARG_NAMES), so that
    the caller passes them in the order the script itself declares."""
    found = re.search(rf"^local {listing} = \{{(.*?)^\}}", source(name), re.MULTILINE | re.DOTALL)
    if found is None:
        raise LookupError(f"tasks/lua/{name}.lua declares no {listing}")
    return tuple(re.findall(r"'([a-z_]+)'", re.sub(r"--[^\n]*", "", found.group(1))))


def register(client: redis.Redis, name: str | Sequence[str], after: str | None = None) -> Script:
    """tasks/lua/NAME.lua registered on `client` (loaded into Redis at its first use); with
    `after`, that file's text comes first (functions several scripts share). A sequence of
    names is one script of those files, joined in order (PUMP)."""
    names = [name] if isinstance(name, str) else list(name)
    if after is not None:
        names.insert(0, after)
    return client.register_script("\n".join(source(n) for n in names))


def run(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """`script(keys, args)` on its own client, minus redis-py's per-call type checks (a hot path:
    several scripts run per job); a Redis that lost the script gets it loaded again."""
    try:
        return script.registered_client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return script(keys=list(keys), args=list(args))
