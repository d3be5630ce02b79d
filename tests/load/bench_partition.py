"""Workers on separate hosts, one of them cut off mid-run. Prints figures; asserts nothing.

  python -m tests.load partition [--jobs 600] [--rate 20] [--concurrency 10] [--cut-at 10]
                                 [--cut-for 20]

Needs root and `ip netns` (Linux network namespaces): it says so and exits where they are
missing. Hosts are network namespaces joined by veth pairs to one bridge (10.77.0.0/24): Redis
on one (10.77.0.2), three worker hosts (10.77.0.11-13), and the sandbox and the producer on the
machine itself (10.77.0.1). --jobs jobs under a global --rate; --cut-at seconds after the first
call the third worker host's link is taken down for --cut-for seconds, then brought back up (its
worker is never restarted). Prints jobs completed / sent, taskUUIDs billed twice, the ledger
against the bill, the API's calls in every second from 5 s before the cut to 5 s after the link
came back, the busiest second, and the jobs the cut-off worker took before and after the cut.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

import redis

from tests.load.common import KEY, ledger_micro, max_in_window
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess, redis_server_binary

NET = "10.77.0"
BRIDGE = "enhbr0"
REDIS_HOST = "enh-redis"
WORKER_HOSTS = ("enh-w1", "enh-w2", "enh-w3")
ADDRESSES = {REDIS_HOST: f"{NET}.2", **{h: f"{NET}.{11 + n}" for n, h in enumerate(WORKER_HOSTS)}}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _link(host: str) -> str:
    """The bridge side of a host's veth pair (what a cut takes down)."""
    return f"{host}-br"[:15]


def build_hosts() -> None:
    teardown()
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{NET}.1/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for host, address in ADDRESSES.items():
        _ip("netns", "add", host)
        _ip("link", "add", _link(host), "type", "veth", "peer", "name", "eth0", "netns", host)
        _ip("link", "set", _link(host), "master", BRIDGE)
        _ip("link", "set", _link(host), "up")
        _ip("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", host, "link", "set", "eth0", "up")
        _ip("-n", host, "link", "set", "lo", "up")


def teardown() -> None:
    for host in ADDRESSES:
        subprocess.run(["ip", "netns", "del", host], capture_output=True)
        subprocess.run(["ip", "link", "del", _link(host)], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


class HostWorker(WorkerProcess):
    """A worker process started inside a host's network namespace."""

    def __init__(self, host: str, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.host = host

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.host, *super().command()]


def _taken(worker: WorkerProcess) -> int:
    return worker.log().count("] received")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--cut-at", type=float, default=10.0)
    parser.add_argument("--cut-for", type=float, default=20.0)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("partition: skipped: needs root and iproute2's `ip netns` (network namespaces)")
        return
    try:
        build_hosts()
    except subprocess.CalledProcessError as exc:
        print(f"partition: skipped: network namespaces not allowed here ({exc.stderr!r})")
        teardown()
        return
    directory = tempfile.mkdtemp(prefix="enhance-partition-")
    redis_ip = ADDRESSES[REDIS_HOST]
    redis_process = subprocess.Popen(
        [
            "ip", "netns", "exec", REDIS_HOST, redis_server_binary(),
            "--bind", redis_ip, "--port", "6379", "--save", "", "--appendonly", "no",
            "--dir", directory, "--protected-mode", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://{redis_ip}:6379/0"
    sandbox = SandboxProcess("--host", "0.0.0.0", "--latency", "0.05", "--api-key", KEY).start()
    env = {
        "REDIS_URL": url,
        "RUNWARE_API_URL": f"http://{NET}.1:{sandbox.port}/v1",
        "RUNWARE_API_KEY": KEY,
        "RUNWARE_RATE_LIMIT": str(args.rate),
        "WORKER_CONCURRENCY": str(args.concurrency),
        "CELERY_VISIBILITY_TIMEOUT_S": "10",
        "RUNWARE_CONNECT_TIMEOUT_S": "1",
        "RUNWARE_TIMEOUT_S": "3",
        "RUNWARE_RETRY_BACKOFF_MAX_S": "2",
        "RUNWARE_MAX_RETRIES": "10",
        "LOG_LEVEL": "DEBUG",  # "Task ... received": the jobs each worker took
    }
    workers = [HostWorker(host, env, name=host) for host in WORKER_HOSTS]
    client = redis.Redis.from_url(url)
    producer = backend_app(broker=url, backend=url)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for worker in workers:
            worker.start(timeout=60)
        results = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"hosts {n}"})
            for n in range(args.jobs)
        ]
        while not sandbox.stats()["call_times"]:
            time.sleep(0.05)
        first = sandbox.stats()["call_times"][0]
        time.sleep(max(0.0, first + args.cut_at - time.time()))
        cut_off = workers[-1]
        before = _taken(cut_off)
        cut = time.time()
        _ip("link", "set", _link(cut_off.host), "down")
        time.sleep(args.cut_for)
        _ip("link", "set", _link(cut_off.host), "up")
        back = time.time()
        done, failed = 0, 0
        end_by = time.monotonic() + 300
        for result in results:
            try:
                value = result.get(timeout=max(1.0, end_by - time.monotonic()))
                done += bool(value.get("text"))
            except Exception:
                failed += 1
        stats = sandbox.stats()
        accepted: dict[str, int] = stats["accepted"]
        twice = sum(1 for n in accepted.values() if n > 1) + max(0, len(accepted) - done)
        bill = int(stats["billed_micro"])
        settle_by = time.monotonic() + 30
        while ledger_micro(client) != bill and time.monotonic() < settle_by:
            time.sleep(0.2)
        times = sorted(stats["call_times"])
        seconds = [
            sum(1 for t in times if start <= t < start + 1)
            for start in (cut - 5 + n for n in range(int(back - cut) + 10))
        ]
        print(
            f"partition: 3 worker hosts x {args.concurrency} at {args.rate}/s, the third cut off "
            f"for {args.cut_for:g} s; {done}/{args.jobs} jobs completed ({failed} failed); "
            f"taskUUIDs billed twice or without a result: {twice}; ledger {ledger_micro(client)}"
            f" micro vs bill {bill} micro; busiest second {max_in_window(times)} calls; jobs the"
            f" cut-off worker took: {before} before the cut, {_taken(cut_off) - before} after"
        )
        print(f"  calls a second from 5 s before the cut to 5 s after it ended: {seconds}")
    finally:
        producer.close()
        client.close()
        for worker in workers:
            worker.stop()
        sandbox.stop()
        redis_process.terminate()
        redis_process.wait(timeout=10)
        teardown()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
