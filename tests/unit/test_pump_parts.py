"""The dispatcher's step is six Lua files joined into one script (tasks/scripts.py, PUMP): each
reads at one sitting, the keys and arguments are named in one list that the dispatcher follows,
and no part reaches a key by its position."""

from __future__ import annotations

import re

import pytest

from tasks.dispatcher import PUMP_ARGS, PUMP_KEYS
from tasks.scripts import PUMP, Grant, Pump, PumpReply, source


def lua_list(name: str) -> tuple[str, ...]:
    """The quoted names of `local NAME = {...}` in pump.lua."""
    found = re.search(rf"^local {name} = \{{(.*?)^\}}", source("pump"), re.MULTILINE | re.DOTALL)
    assert found, name
    body = re.sub(r"--[^\n]*", "", found.group(1))
    return tuple(re.findall(r"'([a-z_]+)'", body))


def test_the_dispatcher_passes_the_keys_and_arguments_in_the_scripts_order() -> None:
    assert lua_list("KEY_NAMES") == PUMP_KEYS
    assert lua_list("ARG_NAMES") == PUMP_ARGS


@pytest.mark.parametrize("part", PUMP)
def test_each_part_reads_at_one_sitting_and_names_its_keys(part: str) -> None:
    text = source(part)
    assert len(text.splitlines()) <= 200, f"{part}.lua is over 200 lines"
    if part != "pump":  # (pump.lua maps KEYS and ARGV to their names)
        assert "KEYS[" not in text, f"{part}.lua reaches a key by its position"


def test_the_phases_are_joined_in_the_order_they_run() -> None:
    header = source("pump").split("\n\n")[0]
    for part in PUMP:
        assert f"{part}.lua" in header or part == "pump", part
    order = [header.index(f"{part}.lua") for part in PUMP if part != "pump"]
    assert order == sorted(order)


def test_the_steps_reply_is_read_by_name() -> None:
    reply = [
        *(b"unread", 5, b"code", 1, b"wait", b"0.25", b"granted", 2, b"read", 3),
        *(b"recovered", 1, b"due_in", b"-1", b"rejected", 4),
        *(b"grants", [b"acme", b"i", b"0.5", b"id-1", b"zeta", b"b", b"1.5", b"id-2"]),
    ]
    step = PumpReply.of(reply)
    assert (step.code, step.wait, step.granted, step.read) == (Pump.OK, 0.25, 2, 3)
    assert (step.recovered, step.due_in, step.rejected, step.unread) == (1, -1.0, 4, 5)
    assert step.grants == (Grant("acme", "i", 0.5, "id-1"), Grant("zeta", "b", 1.5, "id-2"))
    not_ours = PumpReply.of([b"code", -3])
    assert not_ours == PumpReply(code=Pump.NOT_DISPATCHER)
    assert not_ours.grants == ()
