"""The Lua scripts of tasks/lua/, one per file, each with a header listing its KEYS, ARGV and
what it returns; loaded once and registered on a client. Return codes have names here."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script

LUA_DIR = Path(__file__).with_name("lua")


class Pump(IntEnum):
    """pump.lua's first value."""

    OK = 1
    NOT_DISPATCHER = -3


class Wait(IntEnum):
    """pump.lua's second value when it is not a number of seconds to wait."""

    NOW = 0  # more may be due at once
    NOBODY_WAITS = -1
    NO_FREE_SLOT = -2  # the in-flight cap or every worker thread is taken


@cache
def source(name: str) -> str:
    """The text of tasks/lua/NAME.lua."""
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def register(client: redis.Redis, name: str, after: str | None = None) -> Script:
    """tasks/lua/NAME.lua registered on `client` (loaded into Redis at its first use); with
    `after`, that file's text comes first (functions several scripts share)."""
    text = source(name) if after is None else source(after) + "\n" + source(name)
    return client.register_script(text)


def run(script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """`script(keys, args)` on its own client, minus redis-py's per-call type checks (a hot path:
    several scripts run per job); a Redis that lost the script gets it loaded again."""
    try:
        return script.registered_client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return script(keys=list(keys), args=list(args))
