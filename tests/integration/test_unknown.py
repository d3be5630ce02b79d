"""The parked jobs of unknown tasks (tasks/unknown.py) against a real Redis: moved with their
routing key rewritten, dropped by task, sent back once their task is known, each job once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from config.keys import FairKeys
from tasks.unknown import UnknownTasks, describe
from workers.sandbox.services import RedisServer


def _message(task: str, n: int, queue: str = "enhance") -> bytes:
    return json.dumps(
        {
            "body": "W1tdLCB7fSwge31d",
            "content-type": "application/json",
            "headers": {"task": task, "id": f"id-{task}-{n}"},
            "properties": {
                "delivery_tag": f"tag-{task}-{n}",
                "delivery_info": {"exchange": "", "routing_key": queue},
                "body_encoding": "base64",
            },
        }
    ).encode()


@pytest.fixture
def parked(redis_server: RedisServer) -> Iterator[UnknownTasks]:
    client = redis.Redis.from_url(redis_server.url(60))
    client.flushdb()
    yield UnknownTasks(client, FairKeys("enhance"))
    client.flushdb()
    client.close()


def test_a_parked_job_moves_to_another_queue_as_if_sent_there(parked: UnknownTasks) -> None:
    for n in range(3):
        parked.park(_message("otherapp.add", n))
    parked.park(_message("tests.extra.double", 0))
    expected = {("otherapp.add", "enhance"): 3, ("tests.extra.double", "enhance"): 1}
    assert parked.summary() == expected

    moved = parked.move(lambda p: "celery" if p.task == "otherapp.add" else None)

    assert moved == 3
    assert parked.summary() == {("tests.extra.double", "enhance"): 1}
    there = parked.redis.lrange("celery", 0, -1)
    assert [describe(raw).queue for raw in there] == ["celery"] * 3
    ids = [json.loads(raw)["headers"]["id"] for raw in there]  # oldest first at kombu's end
    assert ids == ["id-otherapp.add-2", "id-otherapp.add-1", "id-otherapp.add-0"]


def test_a_job_moved_back_to_its_own_queue_is_unchanged(parked: UnknownTasks) -> None:
    raw = _message("tests.extra.double", 0)
    parked.park(raw)
    assert parked.return_known(frozenset({"tests.extra.double"})) == 1
    assert parked.redis.lrange("enhance", 0, -1) == [raw]
    assert parked.count() == 0
    assert parked.return_known(frozenset({"tests.extra.double"})) == 0  # nothing left: no read


def test_a_job_of_a_task_still_unknown_stays(parked: UnknownTasks) -> None:
    parked.park(_message("otherapp.add", 0))
    assert parked.return_known(frozenset({"tests.extra.double"})) == 0
    assert parked.count() == 1
    assert parked.redis.llen("enhance") == 0


def test_a_job_taken_by_someone_else_meanwhile_is_not_moved_twice(parked: UnknownTasks) -> None:
    raw = _message("otherapp.add", 0)
    parked.park(raw)

    def taken_meanwhile(p: object) -> str:
        parked.redis.lrem(parked.key, 1, raw)  # another operator's move got there first
        return "celery"

    assert parked.move(taken_meanwhile) == 0
    assert parked.redis.llen("celery") == 0


def test_drop_deletes_only_the_named_task(parked: UnknownTasks) -> None:
    parked.park(_message("otherapp.add", 0))
    parked.park(_message("otherapp.add", 1))
    parked.park(_message("tests.extra.double", 0))
    assert parked.drop("otherapp.add") == 2
    assert parked.summary() == {("tests.extra.double", "enhance"): 1}
    assert parked.drop(None) == 1
    assert parked.count() == 0


def test_a_long_list_is_read_in_chunks_oldest_first(parked: UnknownTasks) -> None:
    for n in range(1203):
        parked.park(_message("otherapp.add", n))
    ids = [json.loads(p.raw)["headers"]["id"] for p in parked.parked()]
    assert ids == [f"id-otherapp.add-{n}" for n in range(1203)]
