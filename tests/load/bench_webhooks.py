"""Videos finished by polling against videos finished by Runware's webhook. Prints figures;
asserts nothing.

  ./run bench webhooks [--videos 100] [--render 60] [--poll 60] [--copies 1] [--rate 0]

Each mode runs `--videos` videos of `--render` seconds (the sandbox's render time) sent at once
from this process to one worker (100 threads) on a private Redis:
- polling: no RUNWARE_WEBHOOK_URL; the job polls getResponse at the growing interval
  (RUNWARE_POLL_INTERVAL_S 2, then half the elapsed time, capped at 15 s);
- webhooks: RUNWARE_WEBHOOK_URL points at a real `enhance-worker webhooks` process, the sandbox
  POSTs each video's item when it is done (`--copies` times), polling falls back every `--poll` s.
Figures per mode: getResponse calls (the sandbox's count), rate slots used (grants: the worker's
enhance_rate_limit_wait_seconds_count), webhook POSTs, and the lag from the moment the sandbox
finished a video to the moment its result was stored (date_done), p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.load.common import done_at, percentile, private_redis, worker_env
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess, free_port

VIDEO = {"model": "klingai:5@3", "duration": 5, "width": 1920, "height": 1080}


def _grants(port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "enhance_rate_limit_wait_seconds_count"
    )


def _receiver(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "workers.cli", "webhooks", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return process
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the webhook receiver did not start")
        time.sleep(0.2)


def run_mode(args: argparse.Namespace, hooks: bool) -> dict[str, Any]:
    with private_redis() as server, SandboxProcess() as sandbox:
        url = server.url(1)
        port = free_port()
        settings = {
            "WORKER_CONCURRENCY": "100",
            "METRICS_PORT": "0",
            "RUNWARE_VIDEO_TIMEOUT_S": str(args.render * 4 + 120),
            **({"RUNWARE_RATE_LIMIT": args.rate} if args.rate else {}),
            **(
                {
                    "RUNWARE_WEBHOOK_URL": f"http://127.0.0.1:{port}",
                    "RUNWARE_WEBHOOK_POLL_S": args.poll,
                }
                if hooks
                else {}
            ),
        }
        env = worker_env(url, sandbox, **settings)
        sandbox.configure(video_render_s=args.render, webhook_copies=args.copies)
        receiver = _receiver(env, port) if hooks else None
        try:
            with WorkerProcess(env, name="hooks" if hooks else "polls") as worker:
                app = backend_app(broker=url, backend=url)
                began = time.monotonic()
                sent = [
                    app.send_task("tasks.generate_video", args=[f"a scene {n}"], kwargs=VIDEO)
                    for n in range(args.videos)
                ]
                results = [s.get(timeout=args.render * 4 + 180) for s in sent]
                took = time.monotonic() - began
                grants = _grants(worker.metrics_port())
                metas = [app.backend.get_task_meta(s.id) for s in sent]
                app.close()
        finally:
            if receiver is not None:
                receiver.terminate()
                receiver.wait(10)
        stats = sandbox.stats()
    lags = [
        done_at(meta) - stats["done_at"][result["taskUUID"]]
        for meta, result in zip(metas, results, strict=True)
    ]
    return {
        "took": took,
        "getResponse": stats["by_type"].get("getResponse", 0),
        "grants": grants,
        "posts": len(stats["webhooks"]),
        "billed": sum(stats["accepted"].values()),
        "lags": lags,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--render", type=float, default=60.0, help="seconds a video renders")
    parser.add_argument("--poll", default="60", help="RUNWARE_WEBHOOK_POLL_S with webhooks")
    parser.add_argument("--copies", type=int, default=1, help="POSTs of each webhook item")
    parser.add_argument("--rate", default="", help="RUNWARE_RATE_LIMIT (default: none)")
    args = parser.parse_args()
    print(
        f"== {args.videos} videos of {args.render:g} s, sent at once, one worker of 100 threads"
        + (f", RUNWARE_RATE_LIMIT={args.rate}" if args.rate else "")
    )
    for hooks in (False, True):
        figures = run_mode(args, hooks)
        lags = figures["lags"]
        name = f"webhooks (fallback poll {args.poll} s)" if hooks else "polling"
        print(f"{name}:")
        print(
            f"  all done in {figures['took']:.1f} s; getResponse calls {figures['getResponse']} "
            f"({figures['getResponse'] / args.videos:.2f} a video); rate slots used "
            f"{figures['grants']:g} ({figures['grants'] / args.videos:.2f} a video); webhook "
            f"POSTs {figures['posts']}; billed {figures['billed']} videos"
        )
        print(
            f"  lag after Runware finished: p50 {percentile(lags, 0.5):.2f} s, p99 "
            f"{percentile(lags, 0.99):.2f} s, max {max(lags):.2f} s"
        )
