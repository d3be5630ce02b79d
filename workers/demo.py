"""`enhance-worker demo`: the main job on embedded defaults.

Starts what it needs (a private redis-server unless REDIS_URL or CELERY_BROKER_URL is set on
purpose, the Runware sandbox when RUNWARE_API_KEY is unset), starts a real worker, enhances the
seed page's two examples and one request with three versions, prints each enhanced prompt with
its cost and the total, and stops everything it started.

It never takes another app's jobs: on a private Redis there are none, and on a Redis set on
purpose its worker uses a queue and a key prefix of its own.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from config.settings import ConfigError, Settings, load_settings

SEED_PROMPTS: list[dict[str, Any]] = [
    {
        "prompt": "quiet midnight tea ceremony in a giant overgrown glasshouse, moths circling, "
        "cracked tiles, elegant host in silver robes",
        "promptMaxLength": 260,
        "promptVersions": 1,
    },
    {
        "prompt": "A solitary astronomer in a brass-toned desert camp mapping strange stars beside "
        "a mechanical telescope, surreal retrofuturist mood",
        "promptMaxLength": 260,
        "promptVersions": 1,
    },
    {"prompt": "a red fox in fresh snow at dawn", "promptMaxLength": 120, "promptVersions": 3},
]


@contextlib.contextmanager
def _runware_endpoint(settings: Settings) -> Iterator[dict[str, str]]:
    """The worker's Runware environment: the real API with a key, else a local sandbox."""
    if settings.runware_api_key is not None:
        print(f"Using the real Runware API at {settings.runware_api_url}.")
        yield {}
        return
    from workers.sandbox import Sandbox

    with Sandbox() as sandbox:
        print(
            f"RUNWARE_API_KEY is not set: using the local Runware SANDBOX at {sandbox.url}\n"
            "(a stand-in server speaking Runware's protocol; texts and costs are simulated)."
        )
        yield {"RUNWARE_API_URL": sandbox.url, "RUNWARE_API_KEY": "sandbox-demo-key"}


@contextlib.contextmanager
def _redis(settings: Settings) -> Iterator[str]:
    """The Redis of the demo: the one set on purpose (REDIS_URL or CELERY_BROKER_URL), or a
    private redis-server, so that a Redis that merely answers on the default port (and the
    jobs of another app in it) is never touched."""
    from tasks.redact import redact
    from workers.preflight import NO_REDIS, CommandError
    from workers.sandbox.services import RedisServer, redis_answers

    if {"redis_url", "celery_broker_url"} & settings.model_fields_set:
        if not redis_answers(settings.broker_url):
            raise CommandError(
                f"no Redis answers at {redact(settings.broker_url)} (REDIS_URL); start it, or "
                "unset REDIS_URL to let the demo start a private redis-server",
                NO_REDIS,
            )
        print(f"Using the Redis set in REDIS_URL: {redact(settings.broker_url)}.")
        yield settings.broker_url
        return
    with RedisServer() as server:
        print(f"Started a private redis-server on port {server.port} (REDIS_URL is not set).")
        yield server.url()


def _show(pending: list[Any], timeout: float) -> int:
    """Print each result with its cost, and the total; the number of jobs that failed."""
    total = 0.0
    failed = 0
    for number, (kwargs, async_result) in enumerate(zip(SEED_PROMPTS, pending, strict=True), 1):
        try:
            result = async_result.get(timeout=timeout)
        except Exception as exc:
            failed += 1
            print(f"{number}. FAILED: {kwargs['prompt']}\n   {type(exc).__name__}: {exc}\n")
            continue
        total += float(result["cost"])
        print(f"{number}. {result['prompt']}")
        for version, text in enumerate(result["texts"], start=1):
            label = f"v{version}" if len(result["texts"]) > 1 else "->"
            print(f"   {label} {text}")
        print(f"   cost ${result['cost']:.6f} (taskUUID {result['taskUUID']})\n")
    print(f"Total cost: ${total:.6f} for {len(SEED_PROMPTS) - failed} enhancements.")
    return failed


def run_demo(timeout: float = 120.0) -> int:
    """Run the demo; the exit status."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"enhance-worker: {exc}")
        return 2
    from config.celery import app, result_backend_url
    from tasks.enhancement import enhance_prompt
    from workers.preflight import CommandError
    from workers.sandbox.services import WorkerProcess

    # A queue and a key prefix of its own: on a shared Redis the demo's worker neither takes
    # another app's jobs nor joins (or grants jobs to) another fleet.
    name = f"enhance-demo-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(_redis(settings))
        except CommandError as exc:
            print(f"enhance-worker: {exc}")
            return exc.status
        runware_env = stack.enter_context(_runware_endpoint(settings))
        app.conf.update(broker_url=url, result_backend=result_backend_url(url))
        env = {
            "REDIS_URL": url,
            "CELERY_BROKER_URL": url,
            "CELERY_RESULT_BACKEND": url,
            "KEY_PREFIX": name,
            **runware_env,
        }
        with WorkerProcess(env, name="demo", extra_args=["-Q", name, "--without-gossip"]) as worker:
            print(f"Started a worker (pid {worker.pid}).\n")
            pending = [enhance_prompt.apply_async(kwargs=kw, queue=name) for kw in SEED_PROMPTS]
            failed = _show(pending, timeout)
        app.close()
        if failed:
            print(f"The worker's log is kept at {worker.log_path}.")
        else:
            os.unlink(worker.log_path)
    return 1 if failed else 0
