"""The console command `enhance-worker`: demo, sandbox, enhance, batch, cost, reconcile, failed,
unknown, limits. Every failure is one line with an exit status of its own (workers/preflight.py)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from workers import preflight

if TYPE_CHECKING:
    from config.settings import Settings


def _ready(worker: bool = False) -> Settings:
    """The settings, once their Redis answers (and, with `worker`, once a worker runs)."""
    from config.settings import get_settings, unknown_variables

    settings = get_settings()
    for line in unknown_variables():
        print(f"enhance-worker: warning: {line}", file=sys.stderr)
    preflight.require_redis(settings)
    if worker:
        preflight.require_worker(settings)
    return settings


def _cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(timeout=args.timeout)


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from workers.sandbox import Sandbox, SandboxConfig

    config = SandboxConfig(
        api_key=args.api_key,
        latency_s=args.latency,
        async_delay_s=args.async_delay,
        rate_429=args.rate_429,
        rate_500=args.rate_500,
        rate_503=args.rate_503,
        rate_hang=args.rate_hang,
        rate_garbage=args.rate_garbage,
        hang_s=args.hang,
        cost_per_item=args.cost,
        seed=args.seed,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sandbox = Sandbox(host=args.host, port=args.port, config=config)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise preflight.CommandError(
            f"port {args.port} on {args.host} is in use (another sandbox?); pick a free one "
            "with --port",
            preflight.USAGE,
        ) from None
    print(f"Runware SANDBOX (not the real Runware API) listening on {sandbox.url}", flush=True)
    try:
        sandbox.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
    return 0


def _cmd_webhooks(args: argparse.Namespace) -> int:
    from config.settings import get_settings
    from workers.logs import setup
    from workers.webhooks import serve

    setup(get_settings())  # (the redacting handler: no token or key reaches the log)
    return serve(args.host, args.port)


def _cmd_enhance(args: argparse.Namespace) -> int:
    from celery.exceptions import TimeoutError as ResultTimeout

    from enhance_client.schemas import enhance_request
    from tasks import enhance_prompt

    # Bad input is one line before any Redis is asked; the request validated is the one sent.
    request = enhance_request(
        args.prompt,
        max_length=args.max_length,
        versions=args.versions,
        account=args.account,
        priority=args.priority,
    )
    settings = _ready(worker=True)
    async_result = enhance_prompt.apply_async(kwargs=request.task_kwargs())
    try:
        result = async_result.get(timeout=args.timeout)
    except ResultTimeout:
        # Stop listening for it now (not in AsyncResult.__del__ at interpreter exit, which
        # prints a traceback of its own).
        async_result.backend.remove_pending_result(async_result)  # type: ignore[attr-defined]
        running = preflight.running_workers(settings)
        state = (
            "it is still queued or running, and will finish (and be billed)"
            if running
            else "no worker is running any more: it waits in Redis, and runs (and is billed) "
            f"when one starts; {preflight.START_A_WORKER}"
        )
        raise preflight.CommandError(
            f"no result within {args.timeout:g}s for job {async_result.id}: {state}. Its "
            f"result stays in the result backend for {settings.celery_result_expires_s}s "
            f"(CELERY_RESULT_EXPIRES_S)",
            preflight.NO_WORKER,
        ) from None
    print(json.dumps(result, indent=2))
    return 0


def _cmd_limits(args: argparse.Namespace) -> int:
    from config.settings import format_rate
    from tasks.limiter import get_limiter

    _ready()
    limiter = get_limiter()
    if args.action == "set":
        from enhance_client.schemas import check_account
        from tasks.ledger import get_ledger

        try:
            account = check_account(args.account)
            limiter.set_account(account, rate=args.rate, weight=args.weight, reset=args.reset)
            if args.clear or args.reset:
                get_ledger().clear_budget(account)
            if args.daily_budget is not None:  # inf: "none", no budget at all
                usd = None if math.isinf(args.daily_budget) else args.daily_budget
                get_ledger().set_budget(account, usd)
        except ValueError as exc:
            print(f"enhance-worker: {exc}", file=sys.stderr)
            return 2
    if args.action == "resume":
        was = limiter.paused()
        limiter.resume()
        print("resumed" if was else "not paused")
        return 0
    if args.action == "global":
        changes: dict[str, object] = {}
        if args.reset:
            changes = {"rate": None, "burst": None, "max_in_flight": None}
        if args.rate is not None:
            changes["rate"] = args.rate
        if args.burst is not None:
            changes["burst"] = args.burst
        if args.max_in_flight is not None:
            changes["max_in_flight"] = args.max_in_flight
        try:
            limiter.set_overrides(**changes)
        except ValueError as exc:
            print(f"enhance-worker: {exc}", file=sys.stderr)
            return 2
    state = limiter.state()
    if getattr(args, "json", False):
        print(json.dumps(state))
    else:
        configured, overrides = state["settings"], state["overrides"]
        for name in ("rate", "burst", "max_in_flight"):
            value = overrides.get(name, configured[name])
            source = "override" if name in overrides else "setting"
            shown = "none" if value in (None, 0, 0.0) else value
            if name == "rate" and shown != "none":
                shown = format_rate(value)
            elif isinstance(shown, float) and shown.is_integer():
                shown = int(shown)
            print(f"{name:>14}: {shown} ({source})")
        print(f"{'in flight':>14}: {state['in_flight']}")
        print(f"{'granted, queued':>14}: {state['granted_waiting']}")
        print(f"{'cool-down':>14}: {state['cooldown_s']:.2f}s")
        if state["paused"]:
            since = datetime.fromtimestamp(state["paused"]["since"], UTC).isoformat("T", "seconds")
            print(f"{'PAUSED':>14}: since {since}: {state['paused']['reason']}")
            print(
                f"{'':>14}  (`enhance-worker limits resume`, or start a worker with the right key)"
            )
        for name, account in state["accounts"].items():
            rate = format_rate(account["rate"]) if account["rate"] else "fleet"
            waiting = ", ".join(f"{k} {v}" for k, v in account["waiting"].items())
            print(f"  account {name}: rate {rate}, weight {account['weight']}, waiting {waiting}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from workers import batch

    out = Path(args.out)
    if args.resume:
        pending_path = Path(args.resume)
        if not pending_path.exists() and out.exists():
            print(
                f"Nothing left to collect: {pending_path} is gone, as it is once every job it "
                f"listed is in {out}.",
                file=sys.stderr,
            )
            return 0
        try:
            pending = batch.read_pending(pending_path)
        except (OSError, ValueError, KeyError) as exc:
            raise preflight.CommandError(
                f"cannot read {pending_path}: {exc}", preflight.USAGE
            ) from None
        have = batch.collected(out)
        left = [job for job in pending if job[1] not in have]
        if not left:
            pending_path.unlink(missing_ok=True)
            print(
                f"Nothing left to collect: the {len(pending)} jobs of {pending_path} are all "
                f"in {out}.",
                file=sys.stderr,
            )
            return 0
        settings = _ready()
        print(
            f"Collecting {len(left)} jobs ({len(pending) - len(left)} already in {out}).",
            file=sys.stderr,
        )
        return _collect(args, settings, left, out)
    if args.file is None:
        raise preflight.CommandError("batch needs FILE (or --resume PENDING)", preflight.USAGE)
    try:
        jobs = batch.read_prompts(
            Path(args.file), args.versions, args.max_length, args.account, args.priority
        )
    except OSError as exc:
        raise preflight.CommandError(f"cannot read {args.file}: {exc}", preflight.USAGE) from None
    settings = _ready(worker=True)
    held = batch.results_held(out)
    pending = batch.enqueue(jobs)
    held_text = f" (it already holds {held} line{'s' if held > 1 else ''})" if held else ""
    print(
        f"Enqueued {len(jobs)} jobs; results are appended to {out} as they arrive{held_text}.",
        file=sys.stderr,
    )
    return _collect(args, settings, pending, out)


def _collect(
    args: argparse.Namespace, settings: Settings, pending: list[tuple[int, str, str]], out: Path
) -> int:
    """Wait for `pending` jobs, appending their results to `out`, with progress."""
    from config.celery import app
    from workers import batch

    return batch.run_batch(
        app,
        pending,
        len(pending),
        out,
        workers_running=lambda: preflight.running_workers(settings),
        stall_s=args.stall_after,
    )


def _cmd_cost(args: argparse.Namespace) -> int:
    from config.settings import get_settings
    from tasks.ledger import get_ledger

    _ready()
    ledger, settings = get_ledger(), get_settings()
    try:
        totals = ledger.day(args.day)
    except ValueError as exc:
        print(f"enhance-worker: {exc}", file=sys.stderr)
        return 2
    held = ledger.holdings(args.account).as_json()
    budgets = ledger.budget_report(ledger.day(), args.account)
    report = {
        **totals.as_json(args.account),
        **held,
        "budgets": budgets,
        "estimates": {
            "default": {
                "promptEnhance per version": settings.runware_enhance_cost_usd,
                "imageInference per image": settings.runware_image_cost_usd,
                "videoInference per video": settings.runware_video_cost_usd,
            },
            "learned": ledger.estimates(),
        },
    }
    if args.json:
        print(json.dumps(report))
        return 0
    who = f" for account {args.account}" if args.account else ""
    print(
        f"{report['day']} (UTC){who}: ${report['total_usd']:.6f} settled over "
        f"{report['tasks']} tasks"
    )
    for name, usd in report["by_account"].items():
        print(f"  {name:<24} ${usd:.6f}")
    print(
        f"now: ${held['reserved_usd']:.6f} reserved by {held['reserved_calls']} calls in progress; "
        f"${held['unsettled_usd']:.6f} at estimate for {held['unsettled_calls']} unsettled calls "
        "(being reconciled with Runware)"
    )
    for item in held["unsettled"][:20]:
        usd, day = item["estimate_usd"], item["day"]
        print(f"  {item['taskUUID']}  {item['account']:<16} ${usd:.6f}  started {day}")
    rows = {"(fleet)": budgets["fleet"], **budgets["accounts"]}
    print(
        f"budgets today (spent: settled and reserved; default per account: "
        f"{_usd(budgets['account_default_usd'])}):"
    )
    for name, row in rows.items():
        print(
            f"  {name:<24} budget {_usd(row['budget_usd'])}, spent ${row['spent_usd']:.6f}, "
            f"left {_usd(row['left_usd'])} ({row['source']})"
        )
    return 0


def _usd(value: float | None) -> str:
    return "none" if value is None else f"${value:.6f}"


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from tasks.reconcile import reconcile_now

    _ready()
    summary = reconcile_now(args.timeout)
    if args.json:
        print(json.dumps(summary.__dict__))
        return 0
    print(
        f"checked {summary.checked} unsettled calls: {summary.settled} settled "
        f"(${summary.settled_usd:.6f} recorded), {summary.released} never billed (released), "
        f"{summary.running} still running at Runware, {summary.unknown} could not be checked"
    )
    if summary.waiting:
        print(
            f"{summary.waiting} checks got no answer within {args.timeout:g}s (is a worker "
            "running?); they stay queued and run when a worker takes them"
        )
    return 0


def _cmd_failed(args: argparse.Namespace) -> int:
    from tasks.deadletter import get_dead_letters

    _ready()
    dead = get_dead_letters()
    if args.action == "retry":
        from config.celery import app

        wanted = args.task_uuids or None
        requeued = dead.retry(app, wanted)
        print(f"requeued {len(requeued)} job(s)" + (": " + ", ".join(requeued) if requeued else ""))
        return 0 if requeued or not wanted else 1
    entries = dead.entries()
    if args.json:
        keys = ("taskUUID", "task", "reason", "failedAt", "message")
        print(json.dumps([{k: e[k] for k in keys if k in e} for e in entries]))
        return 0
    if not entries:
        print("no failed jobs")
    for entry in entries:
        print(f"{entry['failedAt']}  {entry['taskUUID']}  {entry['task']}\n    {entry['reason']}")
    return 0


def _cmd_unknown(args: argparse.Namespace) -> int:
    from config.keys import FairKeys
    from tasks.limiter import broker_redis
    from tasks.unknown import UnknownTasks

    settings = _ready()
    parked = UnknownTasks(broker_redis(settings), FairKeys(settings.key_prefix))
    if args.action == "move":
        moved = parked.move(
            lambda p: (args.to or p.queue or None) if args.task in (None, p.task) else None
        )
        print(f"moved {moved} job(s)")
        return 0
    if args.action == "drop":
        if args.task is None and not args.all:
            print("enhance-worker: name the task (--task NAME), or --all", file=sys.stderr)
            return 2
        print(f"dropped {parked.drop(args.task)} job(s)")
        return 0
    summary = parked.summary()
    if args.json:
        rows = [{"task": t, "queue": q, "jobs": n} for (t, q), n in summary.most_common()]
        print(json.dumps(rows))
        return 0
    if not summary:
        print("no parked jobs")
    for (task, queue), count in summary.most_common():
        print(f"{count:>8}  {task or '(no task name)'}  (sent to {queue or '?'})")
    return 0


def _day(text: str) -> str:
    from datetime import date

    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2026-11-25") from None


def _budget(text: str) -> float:
    """A daily budget in USD; "none" (no budget at all) as infinity."""
    if text.strip().lower() == "none":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of USD, or 'none'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a daily budget is >= 0 USD (got {text})")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share of calls from 0 to 1 (got {text})")
    return value


def _account_options(parser: argparse.ArgumentParser, priority: str) -> None:
    parser.add_argument(
        "--account", default=None, help="the account the jobs are fair-shared and billed under"
    )
    parser.add_argument(
        "--priority",
        choices=("interactive", "batch"),
        default=priority,
        help="interactive goes ahead of batch work (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enhance-worker", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the traceback of a failure"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="start what is missing, enhance three prompts, print costs")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per job")
    demo.set_defaults(func=_cmd_demo)

    sandbox = sub.add_parser("sandbox", help="serve a local stand-in for Runware's REST API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8787)
    sandbox.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    sandbox.add_argument("--latency", type=float, default=0.0, help="seconds added to each call")
    sandbox.add_argument("--async-delay", type=float, default=2.0, help="async render seconds")
    sandbox.add_argument("--cost", type=float, default=0.0013, help="USD per returned item")
    sandbox.add_argument("--hang", type=float, default=5.0, help="seconds a hung call takes")
    sandbox.add_argument("--seed", type=int, default=None, help="seed for injected faults")
    for fault in ("429", "500", "503", "hang", "garbage"):
        sandbox.add_argument(
            f"--rate-{fault}",
            dest=f"rate_{fault}",
            type=_share,
            default=0.0,
            help=f"share of calls answered with {fault} (0..1)",
        )
    sandbox.set_defaults(func=_cmd_sandbox)

    webhooks = sub.add_parser(
        "webhooks", help="receive Runware's webhooks (RUNWARE_WEBHOOK_URL points here)"
    )
    webhooks.add_argument("--host", default="0.0.0.0", help="address to listen on")
    webhooks.add_argument("--port", type=int, default=8090, help="port to listen on")
    webhooks.set_defaults(func=_cmd_webhooks)

    enhance = sub.add_parser("enhance", help="enqueue one prompt and print the result")
    enhance.add_argument("prompt")
    enhance.add_argument("--versions", type=int, default=1)
    enhance.add_argument("--max-length", type=int, default=None)
    enhance.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    _account_options(enhance, "interactive")
    enhance.set_defaults(func=_cmd_enhance)

    batch = sub.add_parser("batch", help="enhance every line of a file, with progress")
    batch.add_argument("file", nargs="?", help="one prompt a line, or JSONL with task fields")
    batch.add_argument("--versions", type=int, default=1)
    batch.add_argument("--max-length", type=int, default=None)
    batch.add_argument(
        "--out",
        default="results.jsonl",
        help="JSONL results, appended to (never truncated; default %(default)s)",
    )
    batch.add_argument(
        "--resume",
        metavar="PENDING",
        help="collect an interrupted batch's jobs (those --out does not hold yet)",
    )
    batch.add_argument(
        "--stall-after",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="when nothing finishes for this long, check that a worker runs (default 15)",
    )
    _account_options(batch, "batch")
    batch.set_defaults(func=_cmd_batch)

    cost = sub.add_parser(
        "cost", help="what a UTC day cost, what is reserved and unsettled now, the estimates"
    )
    cost.add_argument("--day", type=_day, default=None, help="YYYY-MM-DD (default: today, UTC)")
    cost.add_argument("--account", default=None, help="only this account")
    cost.add_argument("--json", action="store_true", help="print JSON")
    cost.set_defaults(func=_cmd_cost)

    reconcile = sub.add_parser(
        "reconcile", help="settle unsettled calls now: ask Runware their outcome and cost"
    )
    reconcile.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    reconcile.add_argument("--json", action="store_true", help="print JSON")
    reconcile.set_defaults(func=_cmd_reconcile)

    failed = sub.add_parser("failed", help="jobs that failed for good, and requeueing them")
    failed_sub = failed.add_subparsers(dest="action", required=True)
    failed_list = failed_sub.add_parser("list", help="newest first, with the reason")
    failed_list.add_argument("--json", action="store_true")
    failed_retry = failed_sub.add_parser("retry", help="requeue (all, or these taskUUIDs)")
    failed_retry.add_argument("task_uuids", nargs="*", metavar="TASKUUID")
    failed.set_defaults(func=_cmd_failed)

    parked = sub.add_parser(
        "unknown", help="jobs parked because no worker of the fleet registers their task"
    )
    parked_sub = parked.add_subparsers(dest="action", required=True)
    parked_list = parked_sub.add_parser("list", help="how many wait, by task and queue")
    parked_list.add_argument("--json", action="store_true")
    parked_move = parked_sub.add_parser(
        "move", help="send them to a queue (default: back to the one each was sent to)"
    )
    parked_move.add_argument("--task", help="only the jobs of this task")
    parked_move.add_argument("--to", metavar="QUEUE", help="the Celery queue to send them to")
    parked_drop = parked_sub.add_parser("drop", help="delete them")
    parked_drop.add_argument("--task", help="only the jobs of this task")
    parked_drop.add_argument("--all", action="store_true", help="every parked job")
    parked.set_defaults(func=_cmd_unknown)

    limits = sub.add_parser("limits", help="show or change the fleet-wide limits at run time")
    limits_sub = limits.add_subparsers(dest="action", required=True)
    resume = limits_sub.add_parser(
        "resume", help="let the fleet call again after Runware refused the API key"
    )
    resume.set_defaults(json=False)
    show = limits_sub.add_parser("show", help="the limits in force and what is in flight")
    show.add_argument("--json", action="store_true")
    glob = limits_sub.add_parser(
        "global", help="override RUNWARE_RATE_LIMIT / _BURST / _MAX_IN_FLIGHT for every worker"
    )
    glob.add_argument("--rate", help="N, N/s, N/m or N/h; 0 for no limit")
    glob.add_argument("--burst", type=int)
    glob.add_argument("--max-in-flight", type=int, help="0 for no cap")
    glob.add_argument("--reset", action="store_true", help="remove the overrides first")
    glob.add_argument("--json", action="store_true")
    per_account = limits_sub.add_parser(
        "set", help="an account's own rate and its weight in the fair share, at run time"
    )
    per_account.add_argument("account")
    per_account.add_argument("--rate", help="N, N/s, N/m or N/h; 0 for none of its own")
    per_account.add_argument("--weight", type=int, help="its share when the limit binds, >= 1")
    per_account.add_argument(
        "--daily-budget",
        type=_budget,
        metavar="USD",
        help="its daily budget in USD from now on, across the fleet ('none': no budget)",
    )
    per_account.add_argument(
        "--clear", action="store_true", help="its budget back to RUNWARE_ACCOUNT_DAILY_BUDGET_USD"
    )
    per_account.add_argument("--reset", action="store_true", help="remove its overrides first")
    per_account.add_argument("--json", action="store_true")
    limits.set_defaults(func=_cmd_limits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return preflight.INTERRUPTED
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        status, line = preflight.explain(exc, _settings_if_valid())
        hint = "" if args.verbose else " (-v: the traceback)"
        if status == preflight.FAILED and not preflight.is_job_error(exc):
            line += hint
        print(f"enhance-worker: {line}", file=sys.stderr)
    return status


def _settings_if_valid() -> Settings | None:
    from config.settings import ConfigError, get_settings

    try:
        return get_settings()
    except ConfigError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
