"""The Celery and kombu internals this project overrides, copies or decodes, fingerprinted against
the locked versions: an upgrade that changes one fails here, naming it, instead of showing up
later as a flaky chaos test. docs/architecture.md ("Celery and kombu internals") says what the
project relies on in each, and the upgrade checklist; after checking, update the hash here."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from celery.apps.worker import Worker
from celery.backends import base as celery_base
from celery.backends.redis import RedisBackend
from celery.worker import request, strategy
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

from config.keys import KOMBU_PRIORITY_SEPARATOR, KOMBU_PRIORITY_STEPS, KOMBU_UNACKED
from tasks import messages

CHECKLIST = "docs/architecture.md, 'Celery and kombu internals': its upgrade checklist"

# name -> (the object, what of the project depends on it, sha256[:16] of its source)
INTERNALS: dict[str, tuple[Callable[..., Any], str, str]] = {
    "kombu.transport.redis.QoS.append": (
        kombu_redis.QoS.append,
        "config/transport.py's QoS.append copies its body (and adds the fair intake's custody)",
        "35c655f6ecc62fe6",
    ),
    "kombu.transport.redis.QoS._remove_from_indices": (
        kombu_redis.QoS._remove_from_indices,
        "config/transport.py overrides it to return a slot with the acknowledgement",
        "980a109d54ad9136",
    ),
    "kombu.transport.redis.QoS.restore_by_tag": (
        kombu_redis.QoS.restore_by_tag,
        "calls _remove_from_indices: a restored job must give its slot back the same way",
        "58e161d81b6fe18d",
    ),
    "kombu.transport.redis.Channel._brpop_read": (
        kombu_redis.Channel._brpop_read,
        "config/transport.py wraps it to set an unreadable message aside",
        "c42518699709f2df",
    ),
    "kombu.transport.redis.Channel._create_client": (
        kombu_redis.Channel._create_client,
        "config/transport.py overrides it to share one client per pool",
        "dae92bc4075dafb9",
    ),
    "kombu.transport.virtual.base.Message.__init__": (
        virtual.Message.__init__,
        "config/transport.py's DueMessage takes the ETA out of the payload's headers first",
        "c90d08ccfa2e3e9a",
    ),
    "kombu.transport.virtual.base.Channel.basic_consume": (
        virtual.Channel.basic_consume,
        "builds each consumed message with the channel's Message class (DueMessage)",
        "0fec962694938b61",
    ),
    "celery.backends.redis.RedisBackend._store_result": (
        RedisBackend._store_result,
        "config/backend.py overrides it with one atomic script (the SUCCESS check and the write)",
        "c0214af4c66e2999",
    ),
    "celery.backends.base.compress_payload": (
        celery_base.compress_payload,
        "config/backend.py stores a SUCCESS in its marked, compressed form (by "
        "CELERY_RESULT_COMPRESSION, or over LARGE_RESULT_BYTES); the store script reads its "
        "leading NUL as SUCCESS",
        "13cf04d008002c03",
    ),
    "celery.backends.base.Backend._encode": (
        celery_base.Backend._encode,
        "config/backend.py serializes a state's meta with it (encode() would compress any state)",
        "429a9c3777ebe6d2",
    ),
    "celery.backends.base.decompress_payload": (
        celery_base.decompress_payload,
        "every reader decodes that form by its marker, whatever its own result_compression",
        "8bfab5ab8f854fce",
    ),
    "celery.backends.redis.RedisBackend.on_task_call": (
        RedisBackend.on_task_call,
        "enhance_client/backends.py overrides it: no subscription at send",
        "e05185cfafbadc38",
    ),
    "celery.worker.consumer.Consumer.on_unknown_task": (
        Consumer.on_unknown_task,
        "workers/consumer.py overrides it: a job it cannot run is put back or dead-lettered",
        "35e6cbe564947a25",
    ),
    "celery.worker.consumer.Consumer.on_invalid_task": (
        Consumer.on_invalid_task,
        "workers/consumer.py overrides it",
        "9893e7a4eee33a33",
    ),
    "celery.worker.consumer.Consumer.on_decode_error": (
        Consumer.on_decode_error,
        "workers/consumer.py overrides it",
        "e3538c586a7ffa75",
    ),
    "celery.worker.consumer.Consumer.on_unknown_message": (
        Consumer.on_unknown_message,
        "workers/consumer.py overrides it",
        "213bd3ee55cb5ca6",
    ),
    "celery.apps.worker.Worker.wait_for_soft_shutdown": (
        Worker.wait_for_soft_shutdown,
        "workers/shutdown.py overrides it: the soft shutdown waits only while jobs run",
        "2dda1a44e1f22b87",
    ),
    "celery.worker.request.Request.__init__": (
        request.Request.__init__,
        "tasks/base.py reads the delivery tag from the task request's `properties`, and the ETA "
        "from the headers is what DueMessage clears",
        "efdf47149cde3635",
    ),
    "celery.worker.strategy.default": (
        strategy.default,
        "holds a job with an ETA in the worker's timer: why DueMessage clears it",
        "7d90575ada5eb1dc",
    ),
}


def fingerprint(obj: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", INTERNALS)
def test_each_internal_is_the_one_the_project_was_written_against(name: str) -> None:
    obj, relies, expected = INTERNALS[name]
    found = fingerprint(obj)
    assert found == expected, (
        f"{name} changed (fingerprint {found}, expected {expected}): {relies}. Check it "
        f"against {CHECKLIST}, then set its fingerprint in tests/unit/test_internals.py."
    )


def test_kombus_key_layout_is_the_one_config_keys_writes_down() -> None:
    channel = kombu_redis.Channel
    assert channel.sep == KOMBU_PRIORITY_SEPARATOR, f"kombu's priority `sep`: {CHECKLIST}"
    assert tuple(channel.priority_steps) == KOMBU_PRIORITY_STEPS, f"priority steps: {CHECKLIST}"
    assert channel.unacked_key == KOMBU_UNACKED, f"kombu's unacked key: {CHECKLIST}"


def test_a_message_celery_and_kombu_write_is_read_by_the_dispatcher() -> None:
    """Celery's protocol 2 in kombu's virtual envelope, as a producer of this Celery and kombu
    writes it (kombu's in-memory transport stores the same envelope the Redis one does),
    read by tasks/messages.py: the task, its id, its account and class, its ETA."""
    app = Celery(broker="memory://", set_as_current=False)
    app.conf.task_serializer = "json"
    with app.connection_for_write() as connection:
        sent = app.send_task(
            "tasks.enhance_prompt",
            kwargs={"prompt": "a fox", "account": "acme", "priority": "batch"},
            countdown=30,
            queue="enhance",
            connection=connection,
        )
        payload = connection.default_channel._get("enhance")
    raw = json.dumps(payload).encode()
    known = frozenset({"tasks.enhance_prompt"})
    read = messages.read(raw, known, known)
    assert read.kind == messages.CALL, read.reason
    assert (read.task, read.task_id, read.account, read.klass) == (
        "tasks.enhance_prompt",
        sent.id,
        "acme",
        "b",
    )
    assert read.tag == payload["properties"]["delivery_tag"]
    assert read.due is not None
