"""How the dispatcher reads a message (tasks/messages.py): what it is, whose, and when due."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest

from enhance_client.schemas import EnhanceRequest
from tasks import messages
from tasks.messages import CALL, OTHER, PASS, read

RUNWARE = frozenset({"tasks.enhance_prompt"})
KNOWN = frozenset({"tasks.enhance_prompt", "tasks.collect_batch"})


def message(
    kwargs: dict[str, Any] | None = None,
    task: str = "tasks.enhance_prompt",
    compression: str | None = None,
    **headers: Any,
) -> bytes:
    """A message as kombu's Redis transport stores it (protocol 2, JSON, base64 body)."""
    body = json.dumps([[], kwargs or {}, {"callbacks": None, "chain": None}]).encode()
    more = {}
    if compression:
        body = zlib.compress(body)
        more["compression"] = compression
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": task, "id": "id-1", **more, **headers},
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": "tag-1",
                "delivery_info": {"exchange": "", "routing_key": "enhance"},
            },
        }
    ).encode()


def test_a_call_is_read_with_its_account_and_class() -> None:
    found = read(message({"prompt": "p", "account": "team-a", "priority": "batch"}), RUNWARE, KNOWN)
    assert (found.kind, found.account, found.klass) == (CALL, "team-a", "b")
    assert (found.task_id, found.tag, found.due) == ("id-1", "tag-1", None)
    assert found.code() == "cb0"


@pytest.mark.parametrize(
    ("sent", "label"), [(12345, "12345"), ("bob+test@example.com", "bob+test@example.com")]
)
def test_an_integer_account_id_or_a_plus_address_is_an_account(sent: object, label: str) -> None:
    """The dispatcher and the tasks take the same labels: an integer id as its decimal string
    (the task's validation gives the same), a `+` in an e-mail address as it is."""
    found = read(message({"prompt": "p", "account": sent}), RUNWARE, KNOWN)
    assert (found.kind, found.account) == (CALL, label)
    assert EnhanceRequest(prompt="a lake", account=sent).account == label


@pytest.mark.parametrize("sent", [True, 1.5, "a/b", "", "x" * 65, "tab\there"])
def test_what_no_task_takes_as_an_account_passes_without_a_grant(sent: object) -> None:
    """Refused alike on both sides: the task then fails at once, naming the field."""
    found = read(message({"prompt": "p", "account": sent}), RUNWARE, KNOWN)
    assert found.kind == PASS
    with pytest.raises(ValueError, match="account"):
        EnhanceRequest(prompt="a lake", account=sent)


def test_a_call_without_account_or_priority_is_the_default_accounts_interactive() -> None:
    found = read(message({"prompt": "p"}), RUNWARE, KNOWN)
    assert (found.kind, found.account, found.klass) == (CALL, "default", "i")


def test_a_compressed_call_is_read_as_sent() -> None:
    """A producer with `compression="gzip"`: its batch job keeps its account's rate and lane."""
    raw = message(
        {"prompt": "p", "account": "x", "priority": "batch"}, compression="application/x-gzip"
    )
    found = read(raw, RUNWARE, KNOWN)
    assert (found.kind, found.account, found.klass) == (CALL, "x", "b")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"account": "a b"},
        {"account": "team\n"},
        {"account": "x" * 65},
        {"account": 7.0},
        {"priority": "high"},
        {"priority": None},
    ],
)
def test_a_call_its_task_would_refuse_passes_without_a_grant(kwargs: dict[str, Any]) -> None:
    assert read(message({"prompt": "p", **kwargs}), RUNWARE, KNOWN).kind == PASS


def test_tasks_that_need_no_grant_and_unknown_tasks() -> None:
    assert read(message(task="tasks.collect_batch"), RUNWARE, KNOWN).kind == PASS
    unknown = read(message(task="other_app.send_email"), RUNWARE, KNOWN)
    assert (unknown.kind, unknown.tag) == (OTHER, "tag-1")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"body": "", "headers": {}}', "no `properties`"),
        (b'{"body": "", "properties": {"delivery_info": {}}}', "no `delivery_tag`"),
        (b'{"body": "", "properties": {"delivery_tag": "t"}}', "no `delivery_info`"),
        (b'{"properties": {"delivery_tag": "t", "delivery_info": {}}}', "no `body`"),
    ],
)
def test_what_no_worker_could_read_is_bad_with_its_reason(raw: bytes, reason: str) -> None:
    found = read(raw, RUNWARE, KNOWN)
    assert found.kind == messages.BAD
    assert found.reason.startswith(reason)


def test_a_content_type_or_compression_the_workers_cannot_read_is_bad() -> None:
    pickled = json.loads(message())
    pickled["content-type"] = "application/x-python-serialize"
    found = read(json.dumps(pickled).encode(), RUNWARE, KNOWN)
    assert (found.kind, found.task) == (messages.BAD, "tasks.enhance_prompt")
    assert "application/x-python-serialize" in found.reason
    squeezed = read(message(compression="application/x-snappy"), RUNWARE, KNOWN)
    assert squeezed.kind == messages.BAD
    assert "compression 'application/x-snappy'" in squeezed.reason


def test_an_eta_is_due_at_its_time_utc_when_it_names_no_zone() -> None:
    zoned = read(message(eta="2030-01-01T00:00:10+01:00"), RUNWARE, KNOWN)
    naive = read(message(eta="2030-01-01T00:00:10"), RUNWARE, KNOWN)
    assert zoned.due == 1893456010.0 - 3600
    assert naive.due == 1893456010.0
    assert read(message(eta="soon"), RUNWARE, KNOWN).due is None


def test_a_poll_is_marked_as_continuing() -> None:
    found = read(message({"prompt": "p"}, enhance_continues="1"), RUNWARE, KNOWN)
    assert found.continues
    assert found.code() == "ci1"


def test_a_body_too_large_is_not_decoded_and_a_bomb_is_not_expanded() -> None:
    huge = read(
        message({"prompt": "x" * messages.MAX_DECODE_BYTES, "account": "b"}), RUNWARE, KNOWN
    )
    assert (huge.kind, huge.account) == (CALL, "default")
    bomb_body = zlib.compress(b"[[], {" + b" " * 50_000_000 + b"}, {}]")
    assert len(bomb_body) < 100_000
    raw = json.loads(message(compression="application/x-gzip"))
    raw["body"] = base64.b64encode(bomb_body).decode()
    found = read(json.dumps(raw).encode(), RUNWARE, KNOWN)
    assert (found.kind, found.account) == (CALL, "default")


def test_protocol_1_messages_are_read_from_their_body() -> None:
    body = {
        "task": "tasks.enhance_prompt",
        "id": "p1",
        "kwargs": {"account": "old", "priority": "batch"},
    }
    raw = json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": "application/json",
            "headers": {},
            "properties": {"body_encoding": "base64", "delivery_tag": "t", "delivery_info": {}},
        }
    ).encode()
    found = read(raw, RUNWARE, KNOWN)
    assert (found.kind, found.account, found.klass, found.task_id) == (CALL, "old", "b", "p1")


def test_the_fingerprint_covers_both_ends() -> None:
    a = message({"prompt": "same"})
    b = a.replace(b"tag-1", b"tag-2")
    assert messages.fingerprint(a) != messages.fingerprint(b)
    assert messages.fingerprint(a).startswith(f"{len(a)}:")


@pytest.mark.parametrize(
    "account", ["a", "team-a.b:c@d_e", "a b", "team\n", "x" * 64, "x" * 65, "", "é", 3]
)
@pytest.mark.parametrize("priority", ["interactive", "batch", "high", None])
def test_the_dispatcher_grants_exactly_the_calls_the_tasks_accept(
    account: Any, priority: Any
) -> None:
    """One rule, from both sides: a call the dispatcher grants is one its task accepts, and a
    call it passes without a grant is one its task refuses (so no call is made ungranted)."""
    from pydantic import ValidationError

    from enhance_client.schemas import EnhanceRequest, check_account, check_priority

    kwargs = {"prompt": "p", "account": account, "priority": priority}
    granted = read(message(kwargs), RUNWARE, KNOWN).kind == CALL
    try:
        EnhanceRequest(**kwargs)
    except ValidationError:
        accepted = False
    else:
        accepted = True
    try:  # what tasks.reconcile_call checks
        check_account(account)
        check_priority(priority)
    except ValueError:
        reconcile_accepts = False
    else:
        reconcile_accepts = True
    assert granted == accepted == reconcile_accepts


def test_reading_never_raises_whatever_the_message() -> None:
    """A message that makes the reading fail is BAD: an exception here would stall the fleet's
    dispatcher on it for good."""
    corrupt = json.loads(message({"prompt": "p"}, compression="application/x-gzip"))
    corrupt["body"] = base64.b64encode(b"not zlib at all").decode()
    odd_id = json.loads(message({"prompt": "p"}))
    odd_id["headers"]["id"] = "\udc80"
    listed = json.loads(message({"prompt": "p"}))
    listed["headers"]["compression"] = ["gzip"]
    for raw in (
        b"[" * 100_000,
        json.dumps(corrupt).encode(),
        json.dumps(odd_id).encode(),
        json.dumps(listed).encode(),
    ):
        found = read(raw, RUNWARE, KNOWN)
        assert found.kind in (messages.BAD, CALL)
        if found.kind == CALL:  # the corrupt body: not read, so the default account's
            assert found.account == "default"
    assert read(json.dumps(odd_id).encode(), RUNWARE, KNOWN).kind == messages.BAD


def test_a_batch_callback_goes_compressed_and_is_taken_in_without_decoding_its_body() -> None:
    """enhance_batch's callback carries every part's result: it is sent compressed (a fifth of
    the bytes for every Redis command that moves it), and the dispatcher reads it from its
    headers alone (collect_batch is no Runware task: no body decoded)."""
    from celery import Celery

    from tasks.pipelines import batch_callback

    app = Celery(broker="memory://", set_as_current=False)
    app.conf.task_serializer = "json"
    results = [{"prompt": f"p{n}", "texts": [f"text {n} " * 40] * 5} for n in range(2000)]
    callback = batch_callback()
    with app.connection_for_write() as connection:
        app.send_task(
            callback.task,
            args=[results],
            queue="enhance",
            connection=connection,
            **callback.options,
        )
        payload = connection.default_channel._get("enhance")
    raw = json.dumps(payload).encode()
    assert payload["headers"]["compression"] == "application/x-gzip"
    assert len(raw) < len(json.dumps(results)) / 3
    known = frozenset({"tasks.collect_batch", "tasks.enhance_prompt"})
    read = messages.read(raw, frozenset({"tasks.enhance_prompt"}), known)
    assert read.kind == messages.PASS
    assert read.task == "tasks.collect_batch"
