"""The coalescer on its own: who goes alone, who shares a request, and what each caller gets."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tasks import batching
from tasks.batching import Coalescer


class Recorder:
    """A `send` that records each request's tasks and answers with them."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.requests: list[list[dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.fail = fail

    def __call__(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self.lock:
            self.requests.append(list(tasks))
        if self.fail is not None:
            raise self.fail
        return list(tasks)


def _call_together(
    coalescer: Coalescer[Any], count: int, kinds: tuple[str, ...] = ("a",)
) -> list[Any]:
    """`count` threads call at the same moment, their task types taken in turn from `kinds`;
    each one's answer (or exception), in order."""
    answers: list[Any] = [None] * count
    start = threading.Barrier(count)

    def one(n: int) -> None:
        with coalescer.on_the_way():  # each job's thread enters its call path, then calls
            start.wait()
            try:
                kind = kinds[n % len(kinds)]
                answers[n] = coalescer.call(kind, {"n": n, "kind": kind})
            except BaseException as exc:
                answers[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return answers


def test_a_lone_call_goes_at_once_even_with_a_long_window() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (coalescer.call("a", {"n": 0}), done.set()))
    thread.start()
    thread.join(timeout=10)  # a lingering request would hold it for the 60 s window
    assert done.is_set()
    assert send.requests == [[{"n": 0}]]


def test_concurrent_calls_share_requests_and_each_gets_the_answer_with_its_task() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_size=4, window_s=0.5)
    answers = _call_together(coalescer, 13)
    sizes = [len(request) for request in send.requests]
    assert sum(sizes) == 13
    assert max(sizes) == 4  # full requests leave without waiting for the window
    assert len(send.requests) < 13
    for n, answer in enumerate(answers):
        assert {"n": n, "kind": "a"} in answer  # the request that carried this caller's task


def test_task_types_never_share_a_request() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=0.3)
    _call_together(coalescer, 20, kinds=("promptEnhance", "getResponse"))
    assert sum(len(r) for r in send.requests) == 20
    assert any(len(r) > 1 for r in send.requests)
    for request in send.requests:
        assert len({task["kind"] for task in request}) == 1


def test_a_failed_send_reaches_every_caller_of_its_request() -> None:
    send = Recorder(fail=RuntimeError("boom"))
    coalescer = Coalescer(send, max_size=5, window_s=0.2)
    answers = _call_together(coalescer, 5)
    assert all(isinstance(a, RuntimeError) and str(a) == "boom" for a in answers)
    assert sum(len(r) for r in send.requests) == 5


@pytest.mark.parametrize("window_s", [0.0, 0.5])
def test_max_one_sends_every_task_alone(window_s: float) -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_size=1, window_s=window_s)
    _call_together(coalescer, 8)
    assert sorted(len(r) for r in send.requests) == [1] * 8


def test_serial_calls_never_wait_for_the_window() -> None:
    """One job after another (a serial client): each finds nothing else on its way and leaves
    at once, however long the window; the arrival gaps are not a guess of load."""
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)

    def serial() -> None:
        for n in range(20):
            with coalescer.on_the_way():
                coalescer.call("a", {"n": n})

    client = threading.Thread(target=serial, daemon=True)
    client.start()
    client.join(timeout=10)  # (one held window would be 60 s)
    assert not client.is_alive()
    assert [len(r) for r in send.requests] == [1] * 20


def test_a_request_waits_for_a_call_on_its_way_and_they_share_it() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)
    second_announced, first_waiting = threading.Event(), threading.Event()

    def first() -> None:
        with coalescer.on_the_way():
            second_announced.wait(10)
            first_waiting.set()
            coalescer.call("a", {"n": 1})

    def second() -> None:
        with coalescer.on_the_way():
            second_announced.set()
            first_waiting.wait(10)
            # the first task is (or is about to be) holding its request open for this one
            while not coalescer._open:
                time.sleep(0.001)
            coalescer.call("a", {"n": 2})

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert send.requests == [[{"n": 1}, {"n": 2}]]


def test_a_call_that_leaves_its_path_without_calling_releases_the_wait() -> None:
    """A job announced on its way that ends without a call (its result was already recorded,
    a budget refused it) stops the open request from waiting: it leaves at once."""
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)
    leaving, done = threading.Event(), threading.Event()

    def waits_in_vain() -> None:
        with coalescer.on_the_way():
            leaving.wait(10)
            while not coalescer._open:
                time.sleep(0.001)

    other = threading.Thread(target=waits_in_vain)
    other.start()
    while coalescer.coming < 1:
        time.sleep(0.001)

    def lone() -> None:
        with coalescer.on_the_way():
            leaving.set()
            coalescer.call("a", {"n": 0})
            done.set()

    caller = threading.Thread(target=lone)
    caller.start()
    caller.join(timeout=30)
    other.join(timeout=30)
    assert done.is_set()
    assert send.requests == [[{"n": 0}]]
    assert coalescer.coming == 0


def test_a_received_job_is_waited_for_until_it_starts_or_goes_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job the worker received (`expect`) counts as on its way: a request waits for it, and
    it joins when its thread reaches the call. One that never starts (revoked) stops counting
    after RECEIVED_FOR_S, so a request never waits the whole window for it."""
    monkeypatch.setattr(batching, "RECEIVED_FOR_S", 0.2)
    monkeypatch.setattr(batching, "HOLD_SHARE", 1e9)  # (the recorder answers at once)
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)
    coalescer.expect("job-2")
    assert coalescer.coming == 1
    joined = threading.Event()

    def second() -> None:
        while not coalescer._open:  # the first request is open, waiting for this job
            time.sleep(0.001)
        with coalescer.on_the_way("job-2"):
            coalescer.call("a", {"n": 2})
        joined.set()

    other = threading.Thread(target=second, daemon=True)
    other.start()
    with coalescer.on_the_way("job-1"):
        coalescer.call("a", {"n": 1})
    other.join(timeout=10)
    assert joined.is_set()
    assert send.requests == [[{"n": 1}, {"n": 2}]]
    coalescer.expect("revoked")  # received, never started
    began = time.monotonic()
    with coalescer.on_the_way("job-3"):
        coalescer.call("a", {"n": 3})
    assert time.monotonic() - began < 10  # (not the 60 s window)
    assert send.requests[-1] == [{"n": 3}]
    assert coalescer.coming == 0


def test_only_a_process_under_load_waits_for_calls_not_on_their_way() -> None:
    """Fast arrivals alone are not load (a serial client's calls follow one another quickly):
    a call waits for calls not yet received only while others are out."""
    coalescer: Coalescer[Any] = Coalescer(Recorder(), max_size=10, window_s=0.02)
    for _ in range(20):  # arrivals 1 ms apart or less
        assert coalescer._speculative_hold("a") == 0.0
    coalescer._sending = 3  # requests of other calls are out
    hold = coalescer._speculative_hold("a")
    assert 0.0 < hold <= 0.02
    coalescer._sending = 0
    assert coalescer._speculative_hold("a") == 0.0


def test_a_call_that_is_never_batched_stops_counting_as_it_goes_out() -> None:
    """An image or video call (sent alone, seconds long) is no longer on its way once it goes
    out: a promptEnhance request does not wait the window for it."""
    send = Recorder()
    coalescer = Coalescer(send, max_size=10, window_s=60.0)
    out, finish = threading.Event(), threading.Event()

    def image_job() -> None:
        with coalescer.on_the_way():
            coalescer.arrived()  # as RunwareClient does before sending an unbatched task
            out.set()
            finish.wait(30)  # the long HTTP call

    image = threading.Thread(target=image_job, daemon=True)
    image.start()
    out.wait(10)
    caller = threading.Thread(target=lambda: coalescer.call("promptEnhance", {"n": 1}), daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert not caller.is_alive()
    finish.set()
    image.join(timeout=10)
    assert send.requests == [[{"n": 1}]]


def test_a_request_is_held_no_longer_than_a_share_of_what_requests_take() -> None:
    """Against a fast API, waiting for a call on its way would be most of a job's latency: once
    a request has taken 40 ms, the next is held 10 ms at most (HOLD_SHARE), not the window."""
    assert batching.HOLD_SHARE == 0.25

    def slow(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(0.04)
        return send(tasks)

    send = Recorder()
    coalescer = Coalescer(slow, max_size=10, window_s=60.0)
    coalescer.call("a", {"n": 0})  # alone: nothing on its way
    assert 0.04 * batching.HOLD_SHARE <= coalescer._longest_hold("a") < 0.06 * batching.HOLD_SHARE
    late, leave = threading.Event(), threading.Event()

    def on_its_way_for_long() -> None:
        with coalescer.on_the_way():
            late.set()
            leave.wait(10)

    other = threading.Thread(target=on_its_way_for_long)
    other.start()
    late.wait(10)
    began = time.monotonic()
    coalescer.call("a", {"n": 1})
    waited = time.monotonic() - began - 0.04  # (the request itself takes 40 ms)
    leave.set()
    other.join(timeout=10)
    assert waited < 0.05  # about 10 ms, far from the 60 s window
    assert send.requests == [[{"n": 0}], [{"n": 1}]]
