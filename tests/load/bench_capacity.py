"""What one Redis carries for the fleet's limits and ledger, without Runware or Celery workers in
the way. Prints one line per figure; asserts nothing.

  python -m tests.load capacity [--processes 1,4,16] [--seconds 5] [--messages 6000]

1. calls: the Redis work of one Runware call on the worker's side once its job was granted (the
   "go-now" path: the ledger's start, which checks the budgets and reserves, and its end, which
   records the cost once), run back to back by N processes with a budget set. Prints calls a
   second for N = each of --processes.
2. dispatcher: the fleet's dispatcher (tasks/dispatcher.py, pump.lua) granting --messages queued
   jobs of 10 accounts, no rate limit, to N consumer processes that take each job from the ready
   queue and acknowledge it as the worker's transport does (custody, then the lease given back
   and the dispatcher woken in one transaction). Prints grants a second for each N.

Both run against one private redis-server on this machine's loopback; each N in a fresh database.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import uuid
from typing import Any

import redis

from config.keys import FairKeys
from config.settings import load_settings
from tasks.dispatcher import Dispatcher, Intake
from tasks.ledger import Ledger, call_shape
from tasks.limiter import Limiter
from tests.producer import backend_app
from workers.sandbox.services import RedisServer

SHAPE = call_shape({"taskType": "promptEnhance", "model": "m", "promptVersions": 1})
ITEMS = [{"taskType": "promptEnhance", "text": "a fox, cinematic lighting", "cost": 0.0013}]


def _calls(url: str, seconds: float, prefix: str, counts: Any, slot: int) -> None:
    settings = load_settings(
        _env_file=None, key_prefix=prefix, runware_daily_budget_usd=1_000_000.0
    )
    ledger = Ledger(redis.Redis.from_url(url), settings)
    done, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        task = str(uuid.uuid4())
        ledger.begin(task, f"acct-{done % 10}", 0.0013, SHAPE)
        ledger.end(task, f"acct-{done % 10}", 0.0013, ITEMS, SHAPE)
        done += 1
    counts[slot] = done


def bench_calls(server: RedisServer, processes: int, seconds: float, db: int) -> float:
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Array("i", processes)
    workers = [
        ctx.Process(target=_calls, args=(server.url(db), seconds, "cap", counts, n))
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(int(counts[n]) for n in range(processes)) / seconds


def _consume(url: str, keys: FairKeys, total: int, taken: Any) -> None:
    client = redis.Redis.from_url(url)
    while True:
        with taken.get_lock():
            if taken.value >= total:
                return
        item = client.brpop([keys.ready], timeout=0.5)
        if item is None:
            continue
        tag = json.loads(item[1])["properties"]["delivery_tag"]
        with client.pipeline() as pipe:  # custody, as config/transport.py writes it
            pipe.hdel(keys.transit, tag)
            pipe.zrem(keys.transit_at, tag)
            pipe.execute()
        with client.pipeline() as pipe:  # the acknowledgement: the slot back, the wake-up
            pipe.zrem(keys.leases, tag)
            pipe.zrem(keys.busy, tag)
            pipe.lpush(keys.wake, "1")
            pipe.ltrim(keys.wake, 0, 15)
            pipe.execute()
        with taken.get_lock():
            taken.value += 1


def bench_dispatcher(server: RedisServer, processes: int, messages: int, db: int) -> float:
    url = server.url(db)
    settings = load_settings(_env_file=None, key_prefix="cap")
    client = redis.Redis.from_url(url)
    producer = backend_app(broker=url)
    for n in range(messages):
        producer.send_task(
            "tasks.enhance_prompt",
            kwargs={"prompt": f"p{n}", "account": f"acct-{n % 10}", "priority": "batch"},
        )
    producer.close()
    keys = FairKeys("cap")
    ctx = multiprocessing.get_context("fork")
    taken = ctx.Value("i", 0)
    consumers = [
        ctx.Process(target=_consume, args=(url, keys, messages, taken)) for _ in range(processes)
    ]
    runware = frozenset({"tasks.enhance_prompt"})
    intake = Intake(("enhance",), runware, runware)
    dispatcher = Dispatcher(client, settings, intake, 64, Limiter(client, settings))
    for consumer in consumers:
        consumer.start()
    started = time.monotonic()
    dispatcher.start()
    for consumer in consumers:
        consumer.join()
    took = time.monotonic() - started
    dispatcher.stop()
    dispatcher.join(timeout=5)
    client.close()
    return messages / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--messages", type=int, default=6000)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    with RedisServer() as server:
        db = 1
        for n in counts:
            rate = bench_calls(server, n, args.seconds, db)
            print(f"calls: {n:>2} processes: {rate:,.0f} call starts+ends a second")
            db += 1
        for n in counts:
            rate = bench_dispatcher(server, n, args.messages, db)
            print(f"dispatcher: {n:>2} consumer processes: {rate:,.0f} grants a second")
            db += 1


if __name__ == "__main__":
    main()
