"""The Runware client against the sandbox (a real HTTP server): parsing and status mapping."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from enhance_client.schemas import parse_enhance
from tasks.errors import (
    AuthenticationError,
    ConflictTaskUUID,
    PermanentError,
    RateLimited,
    TransientError,
)
from tasks.limiter import Limiter
from tasks.runware import UNATTRIBUTED, RunwareClient, TaskOutcome, _Answer, _errors_of
from tests.conftest import SECRET
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[RunwareClient]:
    settings = load_settings(
        _env_file=None, runware_api_url=sandbox.url, runware_api_key=SECRET, runware_timeout_s=0.5
    )
    client = RunwareClient(settings, pool_size=4)
    yield client
    client.close()


def _task(versions: int = 1) -> dict[str, object]:
    request = parse_enhance({"prompt": "a red fox", "promptVersions": versions})
    return request.runware_task(str(uuid.uuid4()))


def test_one_item_per_version_with_the_same_task_uuid(client: RunwareClient) -> None:
    task = _task(versions=3)
    outcome = client.run(task)
    assert len(outcome.items) == 3
    assert {item["taskUUID"] for item in outcome.items} == {task["taskUUID"]}
    assert outcome.cost == pytest.approx(3 * 0.0013)


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        ("400", PermanentError, "invalidParameter"),
        ("401", AuthenticationError, "invalidApiKey"),
        ("402", PermanentError, "insufficientCredits"),
        ("403", AuthenticationError, "forbidden"),
        ("404", PermanentError, "notFound"),
        ("429", RateLimited, "queueCapacityExceeded"),
        ("500", TransientError, "serverError"),
        ("503", RateLimited, "serviceUnavailable"),
        ("garbage", TransientError, "badResponse"),
        ("hang", TransientError, "timeout"),
    ],
)
def test_status_mapping(
    client: RunwareClient, sandbox: Sandbox, fault: str, error: type[Exception], code: str
) -> None:
    sandbox.configure(fail_next=[fault], hang_s=1.0)
    with pytest.raises(error) as caught:
        client.run(_task())
    assert getattr(caught.value, "code", None) == code
    assert SECRET not in str(caught.value)
    if isinstance(caught.value, PermanentError):
        assert not isinstance(caught.value, TransientError)


def test_retry_after_is_read(client: RunwareClient, sandbox: Sandbox) -> None:
    sandbox.configure(fail_next=["429"], retry_after_s=2.5)
    with pytest.raises(RateLimited) as caught:
        client.run(_task())
    assert caught.value.retry_after == 2.5


def test_resending_a_task_uuid_is_a_conflict_and_get_response_recovers(
    client: RunwareClient, sandbox: Sandbox
) -> None:
    task = _task(versions=2)
    first = client.run(task)
    with pytest.raises(ConflictTaskUUID):
        client.run(task)
    done, recovered = client.get_response(str(task["taskUUID"]))
    assert done
    assert [i["text"] for i in recovered.items] == [i["text"] for i in first.items]
    assert sandbox.state.accepted[str(task["taskUUID"])] == 1


def test_wrong_key_is_an_authentication_error(sandbox: Sandbox) -> None:
    settings = load_settings(_env_file=None, runware_api_url=sandbox.url, runware_api_key="nope")
    client = RunwareClient(settings)
    with pytest.raises(AuthenticationError, match="check RUNWARE_API_KEY"):
        client.run(_task())
    client.close()


def test_missing_key_fails_without_a_call(sandbox: Sandbox) -> None:
    settings = load_settings(_env_file=None, runware_api_url=sandbox.url)
    client = RunwareClient(settings)
    with pytest.raises(AuthenticationError, match="RUNWARE_API_KEY is not set"):
        client.run(_task())
    assert sandbox.state.requests == 0
    client.close()


def test_both_error_shapes_are_read() -> None:
    new = {"errors": [{"code": "invalidPositivePrompt", "message": "bad"}]}
    old = {"error": {"code": "invalidApiKey", "message": "bad key"}}
    assert _errors_of(new)[0]["code"] == "invalidPositivePrompt"
    assert _errors_of(old)[0]["code"] == "invalidApiKey"
    assert _errors_of({"error": "plain text"}) == [{"message": "plain text"}]
    assert _errors_of(["not", "a", "dict"]) == []


def test_an_echoed_key_is_redacted(client: RunwareClient) -> None:
    assert client.redact(f"bad key {SECRET}!") == "bad key <redacted>!"


def _batching_client(sandbox: Sandbox) -> RunwareClient:
    settings = load_settings(
        _env_file=None,
        runware_api_url=sandbox.url,
        runware_api_key=SECRET,
        runware_batch_window_ms=300,
    )
    return RunwareClient(settings, pool_size=4)


def _run_together(
    client: RunwareClient,
    tasks: list[dict[str, Any]],
    alone: bool = False,
    limiter: Limiter | None = None,
) -> list[object]:
    """Each task in its own thread, all at once (each on its way to the call and heard by
    `limiter`, as a worker's are); each one's outcome or exception, in order."""
    answers: list[object] = [None] * len(tasks)
    start = threading.Barrier(len(tasks))

    def one(n: int) -> None:
        with client.on_the_way():  # as a worker's job thread does (RunwareTask.__call__)
            start.wait()
            try:
                if limiter is None:
                    answers[n] = client.run(tasks[n], alone=alone)
                else:
                    answers[n] = limiter.heard(lambda: client.run(tasks[n], alone=alone))
            except Exception as exc:
                answers[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def test_tasks_sent_together_share_requests_and_keep_their_own_errors(sandbox: Sandbox) -> None:
    client = _batching_client(sandbox)
    tasks = [_task() for _ in range(9)]
    tasks[4]["promptVersions"] = 9  # Runware refuses this one task, and only it
    answers = _run_together(client, tasks)
    client.close()
    assert isinstance(answers[4], PermanentError)
    assert "promptVersions" in str(answers[4])
    for n, answer in enumerate(answers):
        if n != 4:
            assert isinstance(answer, TaskOutcome), answer
            assert [item["taskUUID"] for item in answer.items] == [tasks[n]["taskUUID"]]
    assert sandbox.state.tasks_received == 9
    assert sandbox.state.requests < 9  # some of them shared a request


def test_a_refusal_naming_no_task_is_retried_alone_in_a_slot_of_its_own(
    sandbox: Sandbox,
) -> None:
    """A 400 for a shared request that names no task is nobody's fault yet: the client sends
    nothing more within the call (one request per slot), each task is told to go again alone,
    and alone it gets its own answer."""
    client = _batching_client(sandbox)
    # All six are on their way at once, so they share one request, which is refused without
    # naming a task.
    sandbox.configure(fail_next=["400-unnamed"])
    tasks = [_task() for _ in range(6)]
    answers = _run_together(client, tasks)
    assert sandbox.state.statuses.get("400") == 1
    refused = [n for n, a in enumerate(answers) if isinstance(a, TransientError)]
    assert len(refused) == 6, answers  # the shared request's tasks
    assert all(answers[n].code == UNATTRIBUTED for n in refused)  # type: ignore[union-attr]
    assert sandbox.state.requests == 1  # nothing was resent within the calls
    again = _run_together(client, [tasks[n] for n in refused], alone=True)
    client.close()
    assert all(isinstance(a, TaskOutcome) for a in again), again
    assert sandbox.state.requests == 1 + len(refused)  # one request each


def test_a_refusal_naming_one_task_of_a_shared_request_fails_that_task_alone(
    sandbox: Sandbox,
) -> None:
    """The sandbox's "400" names the request's first task, as Runware's validation errors name
    theirs: that task fails for good, the others were not run and go again."""
    client = _batching_client(sandbox)
    sandbox.configure(fail_next=["400"])
    tasks = [_task() for _ in range(6)]
    answers = _run_together(client, tasks)
    client.close()
    assert sandbox.state.requests == 1
    (named,) = sandbox.state.request_log[0][2][:1]
    by_uuid = {str(t["taskUUID"]): a for t, a in zip(tasks, answers, strict=True)}
    assert isinstance(by_uuid.pop(named), PermanentError)
    assert all(
        isinstance(a, TransientError) and a.code == "batchRejected" for a in by_uuid.values()
    ), by_uuid


def test_a_shared_request_without_credits_fails_each_task_without_a_resend(
    sandbox: Sandbox,
) -> None:
    client = _batching_client(sandbox)
    sandbox.configure(fail_next=["402"])
    answers = _run_together(client, [_task() for _ in range(6)])  # one shared request
    client.close()
    failed = [a for a in answers if isinstance(a, PermanentError)]
    assert len(failed) == 6
    assert all("insufficientCredits" in str(a) for a in failed)
    assert sandbox.state.requests == 1


def test_a_throttled_shared_request_counts_one_strike(
    sandbox: Sandbox, redis_server: RedisServer
) -> None:
    settings = load_settings(
        _env_file=None, runware_cooldown_s=0.05, key_prefix=f"strike{uuid.uuid4().hex[:6]}"
    )
    limiter = Limiter(redis.Redis.from_url(redis_server.url(61)), settings)
    client = _batching_client(sandbox)
    # A process's first call goes alone, until Runware has answered one without refusing the
    # key (a wrong key costs one call per process): that first call is made here.
    _run_together(client, [_task()], limiter=limiter)
    sandbox.configure(fail_next=["429"])
    answers = _run_together(client, [_task() for _ in range(6)], limiter=limiter)
    client.close()
    throttled = [a for a in answers if isinstance(a, RateLimited)]
    assert len(throttled) >= 2, sandbox.state.request_log  # one request carried them all
    assert limiter.redis.get(limiter.keys.strikes) == b"1"
    limiter.redis.close()


def test_a_task_missing_from_an_answer_is_not_taken_for_an_empty_result(
    client: RunwareClient,
) -> None:
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    answer = _Answer(status=200, body={"data": [{"taskUUID": other, "text": "theirs"}]}, size=2)
    with pytest.raises(TransientError, match="without data for this task") as caught:
        client._parse(answer, "promptEnhance", mine)
    assert caught.value.code == "badResponse"
    # For a poll, no item yet means "still working".
    assert client._parse(answer, "getResponse", mine).items == []


def test_a_request_refused_for_another_task_is_retried_for_this_one(client: RunwareClient) -> None:
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    answer = _Answer(status=400, body={"errors": [{"code": "invalidPrompt", "taskUUID": other}]})
    with pytest.raises(TransientError, match="another task of the same request") as caught:
        client._parse(answer, "promptEnhance", mine)
    assert caught.value.code == "batchRejected"
    with pytest.raises(PermanentError, match="invalidPrompt"):
        client._parse(answer, "promptEnhance", other)


def test_a_connection_error_names_the_url_it_tried() -> None:
    from workers.sandbox.services import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    settings = load_settings(_env_file=None, runware_api_url=url, runware_api_key=SECRET)
    client = RunwareClient(settings)
    with pytest.raises(TransientError, match=f"connection to {url} failed") as caught:
        client.run(_task())
    assert "RUNWARE_API_URL" in str(caught.value)
    client.close()


def test_the_calls_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP(S)_PROXY is honoured, as requests honours it (read once, when the process's client is
    built, not on every call): the proxy here answers as Runware would, and saw the request with
    the session's headers, and a cookie its first answer set sent back on the next."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, dict[str, str]]] = []  # each request's target and headers

    class Proxy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            tasks = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, dict(self.headers)))
            item = {**tasks[0], "text": "via the proxy", "cost": 0.0013}
            body = json.dumps({"data": [item]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Set-Cookie", "front=sticky-1; Path=/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        for other in ("NO_PROXY", "no_proxy", "http_proxy", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(other, raising=False)
        settings = load_settings(
            _env_file=None, runware_api_url="http://runware.invalid/v1", runware_api_key=SECRET
        )
        client = RunwareClient(settings)
        outcome = client.run(_task())
        client.run(_task())  # with the cookie the first answer set, as requests sends it back
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [item["text"] for item in outcome.items] == ["via the proxy"]
    assert [(target, headers.get("Authorization", "")) for target, headers in seen] == [
        ("http://runware.invalid/v1", f"Bearer {SECRET}")
    ] * 2
    (_, first), (_, second) = seen
    assert first["Content-Type"] == "application/json"
    assert first["User-Agent"].startswith("enhance-worker")
    assert "Cookie" not in first
    assert second["Cookie"] == "front=sticky-1"
