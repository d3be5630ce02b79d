"""The fair intake and the limits against a real Redis, with real Celery messages but no worker:
a real dispatcher (tasks/dispatcher.py) pumps, and a stand-in for the worker threads takes each
granted job from the ready queue the way the worker's transport does (custody clears the grant's
transit record), holds it for a while, and acknowledges it (which gives its slot back and wakes
the dispatcher, as config/transport.py does)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery

from config.keys import KOMBU_UNACKED, FairKeys
from config.settings import Settings, load_settings
from tasks import dispatcher as dispatcher_module
from tasks import messages
from tasks.base import CONTINUES_HEADER
from tasks.dispatcher import Dispatcher, Intake
from tasks.limiter import Limiter, carry_over_old_overrides
from tests.conftest import wait_until
from workers.sandbox.services import RedisServer

_prefixes = itertools.count()
RUNWARE = frozenset({"tasks.enhance_prompt"})
KNOWN = frozenset({"tasks.enhance_prompt", "tasks.collect_batch"})


@dataclass
class Taken:
    at: float
    task: str
    account: str
    priority: str
    prompt: str = ""


@dataclass
class Fleet:
    """A dispatcher, a producer and `threads` stand-in worker threads on one Redis database."""

    client: redis.Redis
    settings: Settings
    producer: Celery
    threads: int
    hold_s: float = 0.0
    keys: FairKeys = field(init=False)
    limiter: Limiter = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    taken: list[Taken] = field(default_factory=list)
    custody: bool = True  # False: a worker that dies between its fetch and its custody write
    kombu_only: bool = False  # True: kombu's unacked write without clearing the transit record
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = FairKeys(self.settings.key_prefix)
        self.limiter = Limiter(self.client, self.settings)
        intake = Intake(("celery",), RUNWARE, KNOWN)
        self.dispatcher = Dispatcher(self.client, self.settings, intake, self.threads, self.limiter)

    def start(self, workers: bool = True) -> Fleet:
        self.dispatcher.start()
        for _ in range(self.threads if workers else 0):
            thread = threading.Thread(target=self._work, daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def _work(self) -> None:
        own = redis.Redis(connection_pool=self.client.connection_pool)
        while not self._stop.is_set():
            item = own.brpop([self.keys.ready], timeout=0.2)
            if item is None:
                continue
            message = json.loads(item[1])
            tag = message["properties"]["delivery_tag"]
            if self.custody:
                own.hdel(self.keys.transit, tag)
                own.zrem(self.keys.transit_at, tag)
            elif self.kombu_only:
                own.hset(KOMBU_UNACKED, tag, item[1])
            body = json.loads(__import__("base64").b64decode(message["body"]))
            kwargs = body[1]
            self.taken.append(
                Taken(
                    time.monotonic(),
                    message["headers"]["task"],
                    kwargs.get("account", "default"),
                    kwargs.get("priority", "interactive"),
                    kwargs.get("prompt", ""),
                )
            )
            time.sleep(self.hold_s)
            self.limiter.note("ok")
            pipe = own.pipeline()  # the acknowledgement, as config/transport.py makes it
            pipe.zrem(self.keys.leases, tag)
            pipe.zrem(self.keys.busy, tag)
            pipe.lpush(self.keys.wake, "1")
            pipe.execute()

    def send(self, account: str, count: int, priority: str = "batch", **options: Any) -> None:
        for n in range(count):
            self.producer.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": f"{account} {n}", "account": account, "priority": priority},
                **options,
            )

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Taken]:
        deadline = time.monotonic() + timeout
        while len(self.taken) < count:
            assert time.monotonic() < deadline, f"{len(self.taken)} of {count} taken"
            time.sleep(0.01)
        return list(self.taken)

    def stop(self) -> None:
        self._stop.set()
        self.dispatcher.stop()
        if self.dispatcher.is_alive():
            self.dispatcher.join(timeout=3)
        for thread in self._workers:
            thread.join(timeout=2)
        self.producer.close()


@pytest.fixture
def fleet(redis_server: RedisServer) -> Iterator[Any]:
    made: list[Fleet] = []
    db = 59 - len(made)

    def build(threads: int = 4, hold_s: float = 0.0, **settings: Any) -> Fleet:
        url = redis_server.url(db)
        client = redis.Redis.from_url(url)
        client.flushdb()
        values = {"key_prefix": f"t{next(_prefixes)}", **settings}
        made.append(
            Fleet(
                client,
                load_settings(_env_file=None, **values),
                Celery(broker=url),
                threads,
                hold_s,
            )
        )
        return made[-1]

    yield build
    for built in made:
        built.stop()
        built.client.close()


def test_a_rate_spaces_grants_evenly(fleet: Any) -> None:
    f = fleet(runware_rate_limit="10/s").start()
    f.send("a", 8)
    times = [t.at for t in f.wait_for(8)]
    # 10/s: k grants apart are at least k x 100 ms apart; 50 ms of slack for the moment this
    # process sees a grant, which a busy machine delays (a burst of two would be 0 ms apart).
    # (Lower bounds only: a slow machine can only lengthen the gaps, never shorten them.)
    for (i, early), (j, late) in itertools.combinations(enumerate(times), 2):
        assert late - early >= (j - i) * 0.1 - 0.05, times
    # And not slower than the rate: seven intervals of 100 ms, with half again for a busy host
    # (a rate read as 5/s would take 1.4 s).
    assert times[-1] - times[0] <= 7 * 0.1 * 1.5, times


def test_grants_never_outrun_the_worker_threads(fleet: Any) -> None:
    """Two threads, no rate limit: never more than two jobs granted and unfinished at once, so
    granted jobs cannot pile up in the ready queue and leave in a burst."""
    f = fleet(threads=2, hold_s=0.1).start()
    f.send("a", 10)
    peak = 0
    deadline = time.monotonic() + 10
    while len(f.taken) < 10 and time.monotonic() < deadline:
        peak = max(peak, int(f.client.zcard(f.keys.leases)))
        assert f.client.llen(f.keys.ready) <= 2
        time.sleep(0.005)
    f.wait_for(10)
    assert peak == 2


def test_the_in_flight_cap_holds_below_the_threads(fleet: Any) -> None:
    f = fleet(threads=6, hold_s=0.1, runware_max_in_flight=3).start()
    f.send("a", 12)
    peak = 0
    while len(f.taken) < 12:
        peak = max(peak, int(f.client.zcard(f.keys.leases)))
        time.sleep(0.005)
    assert peak == 3


def test_a_dead_holders_slot_returns_after_its_lease(fleet: Any) -> None:
    f = fleet(threads=0, runware_max_in_flight=1, runware_lease_s=0.5)
    f.dispatcher.threads = 4
    f.start(workers=False)
    f.send("a", 2)
    deadline = time.monotonic() + 5
    while f.client.llen(f.keys.ready) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    raw = f.client.rpop(f.keys.ready)  # taken (custody: its transit record cleared), never
    tag = json.loads(raw)["properties"]["delivery_tag"]  # released: the holder "died"
    f.client.hdel(f.keys.transit, tag)
    f.client.zrem(f.keys.transit_at, tag)
    ((dead, expires),) = f.client.zrange(f.keys.leases, 0, -1, withscores=True)
    while f.client.llen(f.keys.ready) < 1:  # the cap of 1 is held until the lease expires
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The next grant (its lease's score: its Redis time + 0.5 s) came no sooner than that.
    leases = f.client.zrange(f.keys.leases, 0, -1, withscores=True)
    ((_, second),) = [(m, score) for m, score in leases if m != dead]
    assert second - 0.5 >= expires - 0.01, (second - 0.5, expires)


def test_a_grant_still_in_the_ready_queue_keeps_its_slot_past_its_lease(fleet: Any) -> None:
    """A lease is a fallback for a dead holder, not a clock on the queue: while no worker has
    taken a granted job (or a passed one), its slot stays taken however long it waits, so
    grants never pile up behind a slow queue and then start together past the cap."""
    f = fleet(threads=0, runware_max_in_flight=2, runware_lease_s=0.3)
    f.dispatcher.threads = 40
    f.start(workers=False)
    for n in range(30):  # passed without a grant, holding threads, never taken
        f.producer.send_task("tasks.collect_batch", args=[[n]])
    f.send("a", 6)
    wait_until(lambda: f.client.llen("celery") == 0, 10, "every message read")
    wait_until(lambda: f.client.zcard(f.keys.leases) == 2, 10, "the cap's two grants")
    ttl = f.client.pttl(f.keys.busy)
    time.sleep(3.0)  # ten lease lifetimes: a clock would have released them all by now
    assert f.client.zcard(f.keys.leases) == 2
    # The renewals keep the sets themselves alive too (else they expire whole while a long
    # queue drains): their TTL was set back, not left to run down by the 3 s.
    assert f.client.pttl(f.keys.busy) > ttl - 1500
    assert f.client.zcard(f.keys.busy) == 30
    assert f.client.llen(f.keys.ready) == 32  # no grant beyond the cap
    assert f.client.llen(f.keys.queue("b", "a")) == 4


def test_a_throttled_call_pauses_every_grant(fleet: Any) -> None:
    f = fleet(threads=2, runware_cooldown_s=0.5, runware_cooldown_max_s=1.0)
    elsewhere = Limiter(f.client, f.settings)  # another worker process's
    elsewhere.note("throttled")
    assert f.client.get(f.keys.strikes) == b"1"
    assert 0 < f.limiter.state()["cooldown_s"] <= 0.5
    elsewhere.note("throttled")
    assert f.client.get(f.keys.strikes) == b"2"
    assert 0.5 < f.limiter.state()["cooldown_s"] <= 1.0  # doubled, to the cap
    elsewhere.note("throttled")
    assert f.client.get(f.keys.strikes) == b"3"
    assert 0.5 < f.limiter.state()["cooldown_s"] <= 1.0  # and held there: 2 s would pass it
    started = time.monotonic()
    f.start()
    f.send("a", 1)
    (taken,) = f.wait_for(1)
    assert taken.at - started >= 0.9
    # A success clears the strikes once this process has learnt of them from its heartbeat
    # (a success before that heartbeat leaves them for the next): send until one does.
    for n in range(2, 12):
        if f.client.get(f.keys.strikes) is None:
            break
        f.send("a", 1)
        f.wait_for(n)
        time.sleep(0.5)
    assert f.client.get(f.keys.strikes) is None


def test_run_time_overrides_apply_to_the_next_grant(fleet: Any) -> None:
    f = fleet(runware_rate_limit=1000)
    f.limiter.set_overrides(rate="5/s")
    f.start()
    f.send("a", 3)
    times = [t.at for t in f.wait_for(3)]
    assert times[-1] - times[0] >= 0.35  # 5/s
    f.limiter.set_overrides(rate=None, max_in_flight=1)
    assert f.limiter.state()["overrides"] == {"max_in_flight": 1.0}
    with pytest.raises(ValueError, match="unknown limit"):
        f.limiter.set_overrides(speed=3)


def test_weights_share_the_rate(fleet: Any) -> None:
    f = fleet(threads=4, runware_rate_limit="100/s")
    f.limiter.set_account("a", weight=3)
    f.limiter.set_account("b", weight=1)
    f.send("a", 24)
    f.send("b", 24)
    f.start()
    order = "".join(t.account for t in f.wait_for(48))
    both = order[:24]  # while both were waiting
    assert both.count("a") == 18, order  # exactly 3 of every 4
    assert f.limiter.accounts()["a"]["weight"] == 3


def test_interactive_goes_first_but_batch_keeps_one_slot_in_ten(fleet: Any) -> None:
    f = fleet(threads=4, runware_rate_limit="200/s")
    f.send("bulk", 20, "batch")
    f.send("user", 30, "interactive")
    f.start()
    order = [t.priority[0] for t in f.wait_for(50)]
    text = "".join(order)
    assert text.startswith("i" * 9 + "b"), text
    assert "i" * 10 not in text[: text.rindex("b")], text  # at most 9 interactive in a row


def test_a_per_account_rate_slows_that_account_only(fleet: Any) -> None:
    f = fleet(threads=4, runware_rate_limit="100/s")
    f.limiter.set_account("slow", rate="5/s")
    f.send("slow", 4)
    f.send("fast", 10)
    f.start()
    taken = f.wait_for(14)
    slow = [t.at for t in taken if t.account == "slow"]
    fast = [t.at for t in taken if t.account == "fast"]
    assert slow[-1] - slow[0] >= 0.55  # 4 calls at 5/s take at least 0.6 s
    # The others are not held back: every fast job went before the slow account's last.
    assert max(fast) < slow[-1], [t.account for t in taken]


def test_an_idle_accounts_timeline_goes(fleet: Any) -> None:
    """Per-account rate state is kept only while it holds something back: 50 accounts that
    each called once leave no timeline behind a second later (it used to be one hash field
    per account ever rate-limited, refreshed by every grant)."""
    f = fleet(threads=8, runware_account_rate_limit="1/s").start()
    for n in range(50):
        f.send(f"acct{n}", 1)
    f.wait_for(50)
    assert f.client.zcard(f.keys.account_tat) > 0
    wait_until(lambda: f.client.zcard(f.keys.account_tat) == 0, 10, "every timeline gone")


def test_no_account_label_reaches_another_key(fleet: Any) -> None:
    """Labels shaped like the service's own key names (a label may contain ':') are kept
    apart: each account's rate and queue stay its own, and the dispatcher never halts."""
    f = fleet(threads=4, runware_rate_limit="100/s")
    f.limiter.set_account("team-b", rate="2/s")
    f.limiter.set_account("tat:team-b", weight=2)
    tricky = ["tat:team-b", "acct:rate", "rate", "weight", "q:b", "active:b", "tat", "team-b"]
    for label in tricky:
        f.send(label, 1)
    f.start()
    taken = f.wait_for(len(tricky))
    assert sorted(t.account for t in taken) == sorted(tricky)
    assert f.limiter.accounts()["team-b"]["rate"] == 2.0
    assert f.limiter.accounts()["tat:team-b"]["rate"] is None
    with pytest.raises(ValueError, match="not a label"):
        f.limiter.set_account("a/b", rate="1/s")


def test_a_countdown_waits_in_redis_not_in_a_worker(fleet: Any) -> None:
    f = fleet(threads=2).start()
    sent = time.monotonic()
    wall = time.time()
    f.send("a", 1, countdown=1.0)
    wait_until(lambda: f.client.zcard(f.keys.delayed) == 1, 5, "the countdown kept in Redis")
    ((_, due),) = f.client.zrange(f.keys.delayed, 0, -1, withscores=True)
    assert wall + 0.9 <= due <= time.time() + 1.0  # due one second after it was sent
    (taken,) = f.wait_for(1)
    assert taken.at - sent >= 0.9  # and not taken before then (however late a busy host is)


def test_other_tasks_pass_without_a_grant_and_unknown_ones_are_parked(fleet: Any) -> None:
    """A task that does not call Runware is not held by the limits (a rate of 1/s would take
    seconds for these); one the workers do not know never reaches them: it is parked."""
    f = fleet(threads=2, runware_rate_limit="1/s").start()
    for n in range(3):
        f.producer.send_task("tasks.collect_batch", args=[[n]])
        f.producer.send_task("another.app.task", args=[n])
    taken = f.wait_for(3, timeout=3)
    assert {t.task for t in taken} == {"tasks.collect_batch"}
    assert f.client.zcard(f.keys.leases) == 0
    wait_until(lambda: f.client.llen(f.keys.unknown) == 3, 5, "the unknown task's jobs parked")
    # All six are accounted for, so none of the unknown task's can still reach a worker.
    assert (f.client.llen(f.keys.ready), len(f.taken)) == (0, 3)


def test_a_body_too_large_to_decode_is_never_decoded_and_its_call_still_waits(
    fleet: Any,
) -> None:
    """The dispatcher decodes a message's body only for a task that calls Runware, and only
    up to MAX_DECODE_BYTES. A larger call (here a huge prompt; in practice a long chain or
    chord embedded in its message) is not read, so its account is not known: it still waits
    for a grant, as the default account's. A large message of another task passes as it is."""
    f = fleet(threads=4, runware_rate_limit="1/s").start(workers=False)
    huge = "x" * messages.MAX_DECODE_BYTES
    f.producer.send_task(
        "tasks.enhance_prompt", kwargs={"prompt": huge, "account": "big", "priority": "batch"}
    )
    f.producer.send_task("tasks.collect_batch", args=[[{"text": huge}] * 8])
    f.send("small", 3)
    wait_until(lambda: f.client.llen("celery") == 0, 10, "every message read")
    wait_until(lambda: f.client.zcard(f.keys.leases) == 1, 10, "one grant (1/s)")
    assert not f.client.exists(f.keys.queue("b", "big"))  # never read as a call of "big"
    waiting = f.client.llen(f.keys.queue("i", "default")) + f.client.llen(
        f.keys.queue("b", "small")
    )
    assert waiting == 3  # four calls: one granted, three waiting for the rate
    assert f.client.zcard(f.keys.busy) == 1  # only collect_batch passed without a grant
    ready = [json.loads(raw)["headers"]["task"] for raw in f.client.lrange(f.keys.ready, 0, -1)]
    assert sorted(ready) == ["tasks.collect_batch", "tasks.enhance_prompt"]


def test_a_job_lost_between_the_ready_queue_and_a_worker_comes_back(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed after its fetch but before its custody write: the dispatcher finds the
    grant in neither the ready queue nor a worker's custody, and queues the job again."""
    monkeypatch.setattr(dispatcher_module, "TRANSIT_CHECK_S", 0.5)
    f = fleet(threads=1)
    f.custody = False
    f.start()
    f.send("a", 1)
    f.wait_for(1)
    assert f.client.hlen(f.keys.transit) == 1  # granted, fetched, never taken into custody
    f.custody = True
    taken = f.wait_for(2, timeout=5)
    assert taken[0].account == taken[1].account == "a"
    assert f.client.hlen(f.keys.transit) == 0


def _ready_tags(f: Fleet) -> list[str]:
    return [
        json.loads(raw)["properties"]["delivery_tag"]
        for raw in f.client.lrange(f.keys.ready, 0, -1)
    ]


def test_a_grant_still_in_the_ready_queue_is_never_queued_again(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granted jobs wait in the ready queue longer than the check's grace (every thread busy),
    with a message someone else put there (kombu restoring one) in front: none is taken for lost
    while queued. Then two leave the queue without a custody write, the foreign one and one of
    ours: only ours comes back, once."""
    monkeypatch.setattr(dispatcher_module, "TRANSIT_CHECK_S", 0.3)
    f = fleet(threads=0)
    f.dispatcher.threads = 4
    f.start(workers=False)
    f.send("a", 3)
    wait_until(lambda: f.client.llen(f.keys.ready) == 3, 10, "three granted")
    foreign = json.dumps({"body": "", "headers": {}, "properties": {"delivery_tag": "kombu-1"}})
    f.client.rpush(f.keys.ready, foreign)  # restored by kombu: next to be taken
    time.sleep(1.0)  # three grace periods
    assert f.client.llen(f.keys.ready) == 4  # nothing was queued again
    assert f.client.hlen(f.keys.transit) == 3
    assert f.client.rpop(f.keys.ready) == foreign.encode()
    lost = json.loads(f.client.rpop(f.keys.ready))  # taken, and the taker died before custody
    wait_until(lambda: f.client.llen(f.keys.ready) == 3, 5, "the lost grant back")
    assert _ready_tags(f).count(lost["properties"]["delivery_tag"]) == 1
    time.sleep(0.8)
    assert f.client.llen(f.keys.ready) == 3  # once


def test_an_earlier_versions_transit_records_are_placed_once(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records an earlier version wrote (granted at a time, place unknown): one whose message is
    still queued stays recorded, one whose message is gone is queued again."""
    f = fleet(threads=0)
    f.dispatcher.threads = 4
    f.start(workers=False)
    f.send("a", 2)
    wait_until(lambda: f.client.llen(f.keys.ready) == 2, 10, "two granted")
    f.dispatcher.stop()
    f.dispatcher.join(timeout=3)
    older, newer = (json.loads(raw) for raw in reversed(f.client.lrange(f.keys.ready, 0, -1)))
    f.client.rpop(f.keys.ready)  # the older one, lost in a fetch under the earlier version
    f.client.delete(f.keys.transit_at, f.keys.ready_pushed)
    for message in (older, newer):
        f.client.zadd(f.keys.transit_legacy, {message["properties"]["delivery_tag"]: time.time()})
    monkeypatch.setattr(dispatcher_module, "TRANSIT_CHECK_S", 0.3)
    heir = Dispatcher(f.client, f.settings, f.dispatcher.intake, 4)
    heir.start()
    try:
        wait_until(lambda: f.client.llen(f.keys.ready) == 2, 5, "the lost one back")
        assert sorted(_ready_tags(f)) == sorted(
            m["properties"]["delivery_tag"] for m in (older, newer)
        )
        assert f.client.zcard(f.keys.transit_legacy) == 0
        time.sleep(0.8)
        assert f.client.llen(f.keys.ready) == 2
    finally:
        heir.stop()
        heir.join(timeout=3)


def test_accounts_their_own_rate_holds_back_leave_the_round_robin(fleet: Any) -> None:
    """With per-account rates, an account that may not call yet waits in the parked set, not in
    the ring a pick walks: the walk meets only accounts that may call, at any number of them."""
    f = fleet(threads=0, runware_account_rate_limit=0.5)
    f.dispatcher.threads = 100
    for account in range(40):
        f.send(f"acct-{account}", 2)
    f.start(workers=False)
    wait_until(lambda: f.client.llen(f.keys.ready) == 40, 10, "one job of each account")
    wait_until(lambda: f.client.zcard(f.keys.parked) == 40, 10, "every account parked")
    assert f.client.llen(f.keys.ring("b")) == 0
    assert f.client.scard(f.keys.active("b")) == 40  # still waiting, so not queued twice
    wait_until(lambda: f.client.llen(f.keys.ready) == 80, 10, "each account's second job")
    assert f.client.zcard(f.keys.parked) == 0


def test_any_task_id_keeps_its_message_whole(fleet: Any) -> None:
    """Task ids and delivery tags are the producer's strings: one with the separator of the
    fair lists' entries must reach the worker as sent (a cut message crashed workers)."""
    f = fleet(threads=2).start()
    f.producer.send_task(
        "tasks.enhance_prompt",
        kwargs={"prompt": "odd id", "account": "a"},
        task_id="abc|def|123",
    )
    (taken,) = f.wait_for(1)
    assert taken.prompt == "odd id"
    # Its slot goes back with its acknowledgement (just after the job is seen as taken).
    wait_until(lambda: f.client.zcard(f.keys.leases) == 0, 5, "the slot back")


def test_jobs_without_a_grant_hold_threads_too(fleet: Any) -> None:
    """Tasks that do not call Runware pass without a grant but occupy worker threads: while
    they fill every thread, no Runware job is granted (it would wait in the ready queue and
    then start with the others at once, past the rate)."""
    f = fleet(threads=2, hold_s=1.5)
    for n in range(4):
        f.producer.send_task("tasks.collect_batch", args=[[n]])
    f.start()
    f.wait_for(2)  # both threads busy with them, two more waiting
    f.send("a", 1)
    # Taken into its account's queue by a pump step, which would have granted it in the same
    # step had a thread been free: it waits there, with no lease.
    wait_until(lambda: f.client.llen(f.keys.queue("b", "a")) == 1, 5, "the job taken in")
    assert f.client.zcard(f.keys.leases) == 0  # not granted while no thread is free
    taken = f.wait_for(5)
    assert taken[-1].task == "tasks.enhance_prompt"
    assert f.client.zcard(f.keys.busy) == 0


def test_a_grant_in_kombus_custody_is_not_queued_twice(
    fleet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer with kombu's own transport writes the unacked entry but leaves the grant's
    record: kombu redelivers that job if need be, so the dispatcher must not queue it again."""
    monkeypatch.setattr(dispatcher_module, "TRANSIT_CHECK_S", 0.3)
    f = fleet(threads=1)
    f.custody, f.kombu_only = False, True
    f.start()
    f.send("a", 1)
    f.wait_for(1)
    deadline = time.monotonic() + 5
    while f.client.hlen(f.keys.transit):  # checked, found in kombu's custody, dropped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(f.taken) == 1


def test_a_waiting_dispatcher_hands_over_when_its_process_dies(
    fleet: Any, redis_server: RedisServer
) -> None:
    f = fleet(threads=2).start()
    f.send("a", 1)
    f.wait_for(1)
    f.dispatcher.stop()  # the holder stops without releasing the lock: it expires
    f.dispatcher.join(timeout=3)
    heir = Dispatcher(f.client, f.settings, f.dispatcher.intake, 2)
    heir.start()
    try:
        f.send("a", 1)
        f.wait_for(2, timeout=10)
    finally:
        heir.stop()
        heir.join(timeout=3)


def test_overrides_set_before_an_upgrade_are_carried_over(fleet: Any) -> None:
    f = fleet()
    old = f"{f.settings.key_prefix}:limit:global"
    f.client.hset(f"{old}:overrides", mapping={"rate": "7.0"})
    f.client.hset(f"{old}:acct:team-a", mapping={"rate": "2.0", "weight": "3"})
    f.client.sadd(f"{old}:accounts", "team-a")
    assert carry_over_old_overrides(f.client, f.settings) == 3
    state = f.limiter.state()
    assert state["overrides"] == {"rate": 7.0}
    assert state["accounts"]["team-a"] == {
        "rate": 2.0,
        "weight": 3,
        "waiting": {"interactive": 0, "batch": 0},
    }
    assert carry_over_old_overrides(f.client, f.settings) == 0  # once


def test_a_poll_back_from_its_countdown_goes_ahead_of_its_accounts_backlog(fleet: Any) -> None:
    """A poll (a countdown that ended, marked by the task as continuing a call under way) is
    not sent to the back of its own account's backlog; a retry or any other countdown is."""
    f = fleet(threads=2, runware_rate_limit="10/s").start()
    for prompt, continues in (("the poll", "1"), ("the retry", "0")):
        f.producer.send_task(
            "tasks.enhance_prompt",
            kwargs={"prompt": prompt, "account": "a", "priority": "batch"},
            countdown=0.5,
            headers={CONTINUES_HEADER: continues},
        )
    f.send("a", 30)
    order = [t.prompt for t in f.wait_for(12, timeout=10)]
    # Due after 0.5 s (about the 6th grant at 10/s), the poll goes next, not after the 30.
    assert "the poll" in order, order
    assert "the retry" not in order, order


def test_threads_queued_behind_the_first_call_go_together_once_it_is_answered(
    redis_server: RedisServer,
) -> None:
    """A process's first call tries the key alone; when it is answered, the threads that
    queued behind it call at once, not one after another."""
    client = redis.Redis.from_url(redis_server.url(58))
    limiter = Limiter(client, load_settings(_env_file=None, key_prefix=f"t{next(_prefixes)}"))
    first_may_end, queued = threading.Event(), 3
    together = threading.Barrier(queued, timeout=1)  # (less than KEY_TRY_WAIT_S)
    outcomes: list[str] = []

    def first_call() -> str:
        assert first_may_end.wait(5)
        return "first"

    def later_call() -> str:
        together.wait()  # broken (an exception) unless all of them are in their call at once
        return "later"

    first = threading.Thread(target=lambda: outcomes.append(limiter.heard(first_call)))
    first.start()
    wait_until(lambda: limiter._first_call.locked(), 5, "the first call to start")
    later = [
        threading.Thread(target=lambda: outcomes.append(limiter.heard(later_call)))
        for _ in range(queued)
    ]
    for thread in later:
        thread.start()
    time.sleep(0.1)  # (they queue on the first call)
    first_may_end.set()
    for thread in [first, *later]:
        thread.join(10)
    client.close()
    assert sorted(outcomes) == ["first"] + ["later"] * queued
