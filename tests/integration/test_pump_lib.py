"""The dispatcher step's key-free functions (tasks/lua/pump_lib.lua), run alone in a real Redis:
the message fingerprint the step compares with the dispatcher's, and the fair lists' entries."""

from __future__ import annotations

import json
import os

import pytest
import redis

from tasks import messages
from tasks.scripts import source
from workers.sandbox.services import RedisServer


@pytest.fixture
def lua(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url(12))
    yield client  # type: ignore[misc]
    client.close()


def run(client: redis.Redis, body: str, *args: bytes | str | float) -> object:
    """`body` after pump_lib.lua, as one script (the way the step is built)."""
    return client.eval(source("pump_lib") + "\n" + body, 0, *args)


@pytest.mark.parametrize("size", [0, 10, 512, 1024, 1025, 300_000])
def test_the_step_fingerprints_a_message_as_the_dispatcher_does(
    lua: redis.Redis, size: int
) -> None:
    raw = os.urandom(size)
    assert run(lua, "return fingerprint(ARGV[1])", raw) == messages.fingerprint(raw).encode()


def test_a_changed_middle_is_not_seen_but_a_changed_end_or_length_is(lua: redis.Redis) -> None:
    """What the fingerprint promises, and no more: the step checks it popped the message it was
    told about (its ends carry the envelope and the task id), not every byte."""
    raw = bytearray(os.urandom(4096))
    first = run(lua, "return fingerprint(ARGV[1])", bytes(raw))
    raw[2000] ^= 0xFF
    assert run(lua, "return fingerprint(ARGV[1])", bytes(raw)) == first
    raw[-1] ^= 0xFF
    assert run(lua, "return fingerprint(ARGV[1])", bytes(raw)) != first
    assert run(lua, "return fingerprint(ARGV[1])", bytes(raw[:-1])) != first


ROUND_TRIP = """
local since, id, tag, raw = unpack_entry(pack_entry(tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]))
return {tostring(since), id, tag, raw}
"""


@pytest.mark.parametrize(
    ("task_id", "tag"),
    [
        ("0b9f3c1e-2a4d-4c6e-8f10-123456789abc", "c3a5e2d0-7f41-4b8e-9d2c-1a2b3c4d5e6f"),
        ("an|id|with|bars", ""),  # ids and tags are the producer's strings
        ("", "7"),
        ("\x00\xff binary", "tag\nwith a newline"),
    ],
)
def test_a_fair_list_entry_gives_back_what_went_in(
    lua: redis.Redis, task_id: str, tag: str
) -> None:
    raw = json.dumps({"body": "x" * 70_000, "headers": {"id": task_id}}).encode() + b"|\x00|"
    since = "1733412345.125"
    got = run(lua, ROUND_TRIP, since, task_id, tag, raw)
    assert got == [since.encode(), task_id.encode(), tag.encode(), raw]


def test_an_entry_is_the_form_the_previous_dispatcher_reads(lua: redis.Redis) -> None:
    """During a rolling upgrade the dispatcher's role can pass to a worker of the previous
    version, which reads the fair lists' entries as "<since>|<id length>|<tag length>|<id><tag>
    <message>": the entries keep that form."""
    task_id, tag, raw = "id|1", "tag", b'{"a": "b|c"}'
    packed = run(
        lua,
        "return pack_entry(tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4])",
        "1733412345.5",
        task_id,
        tag,
        raw,
    )
    assert packed == f"1733412345.5|{len(task_id)}|{len(tag)}|{task_id}{tag}".encode() + raw
