"""The dispatcher's step is six Lua files joined into one script (tasks/scripts.py, PUMP): each
reads at one sitting, the keys and arguments are named in one list (pump.lua's header) that the
dispatcher follows, and no part reaches a key by its position."""

from __future__ import annotations

import pytest

from config.keys import FairKeys
from config.settings import load_settings
from tasks.dispatcher import PUMP_ARGS, PUMP_KEYS, pump_args, pump_keys
from tasks.scripts import PUMP, Grant, Pump, PumpReply, declared, source


def test_the_dispatcher_names_every_key_and_argument_the_script_declares() -> None:
    """pump.lua's KEY_NAMES and ARG_NAMES are the one list (the dispatcher passes the keys and
    arguments in their order): the dispatcher has a value for each name, and none other."""
    assert PUMP_KEYS[:3] == ("intake", "delayed", "ready")  # (the declaration is read)
    assert len(PUMP_KEYS) == 34
    assert set(pump_keys(FairKeys("enhance"))) == set(PUMP_KEYS)
    assert len(PUMP_ARGS) == 11
    assert set(pump_args("d-1", load_settings(_env_file=None))) == set(PUMP_ARGS)
    with pytest.raises(LookupError, match=r"pump\.lua declares no NAMES"):
        declared("pump", "NAMES")


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
