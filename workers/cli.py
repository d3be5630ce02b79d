"""The console command `enhance-worker`: demo, sandbox, enhance, batch, cost, reconcile, failed,
limits."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


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
    sandbox = Sandbox(host=args.host, port=args.port, config=config)
    print(f"Runware SANDBOX (not the real Runware API) listening on {sandbox.url}", flush=True)
    try:
        sandbox.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
    return 0


def _cmd_enhance(args: argparse.Namespace) -> int:
    from tasks import ValidationError, enhance

    try:
        async_result = enhance(args.prompt, max_length=args.max_length, versions=args.versions)
    except ValidationError as exc:
        print(f"enhance-worker: {exc}", file=sys.stderr)
        return 2
    result = async_result.get(timeout=args.timeout)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_limits(args: argparse.Namespace) -> int:
    from tasks.limiter import get_limiter

    limiter = get_limiter()
    if args.action == "set":
        try:
            limiter.set_account(args.account, rate=args.rate, weight=args.weight, reset=args.reset)
        except ValueError as exc:
            print(f"enhance-worker: {exc}", file=sys.stderr)
            return 2
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
            print(f"{name:>14}: {value if value not in (None, 0, 0.0) else 'none'} ({source})")
        print(f"{'in flight':>14}: {state['in_flight']}")
        print(f"{'cool-down':>14}: {state['cooldown_s']:.2f}s")
        for name, account in state["accounts"].items():
            rate = account["rate"] or "fleet"
            waiting = ", ".join(f"{k} {v}" for k, v in account["waiting"].items())
            print(f"  account {name}: rate {rate}, weight {account['weight']}, waiting {waiting}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from config.celery import app
    from tasks import ValidationError
    from workers import batch

    out = Path(args.out)
    if args.resume:
        pending = batch.read_pending(Path(args.resume))
        total = len(pending)
    else:
        if args.file is None:
            print("enhance-worker: batch needs FILE (or --resume)", file=sys.stderr)
            return 2
        try:
            jobs = batch.read_prompts(Path(args.file), args.versions, args.max_length)
        except (ValidationError, OSError) as exc:
            print(f"enhance-worker: {exc}", file=sys.stderr)
            return 2
        out.write_text("", encoding="utf-8")
        pending = batch.enqueue(app, jobs)
        total = len(jobs)
        print(f"Enqueued {total} jobs; writing results to {out} as they arrive.", file=sys.stderr)
    return batch.run_batch(app, pending, total, out)


def _cmd_cost(args: argparse.Namespace) -> int:
    from config.settings import get_settings
    from tasks.ledger import get_ledger

    ledger, settings = get_ledger(), get_settings()
    try:
        totals = ledger.day(args.day)
    except ValueError as exc:
        print(f"enhance-worker: {exc}", file=sys.stderr)
        return 2
    held = ledger.holdings(args.account).as_json()
    report = {
        **totals.as_json(args.account),
        **held,
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
    return 0


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from tasks.reconcile import reconcile_now

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

    dead = get_dead_letters()
    if args.action == "retry":
        from config.celery import app

        wanted = args.task_uuids or None
        requeued = dead.retry(app, wanted)
        print(f"requeued {len(requeued)} job(s)" + (": " + ", ".join(requeued) if requeued else ""))
        return 0 if requeued or not wanted else 1
    entries = dead.entries()
    if args.json:
        keys = ("taskUUID", "task", "reason", "failedAt")
        print(json.dumps([{k: e[k] for k in keys} for e in entries]))
        return 0
    if not entries:
        print("no failed jobs")
    for entry in entries:
        print(f"{entry['failedAt']}  {entry['taskUUID']}  {entry['task']}\n    {entry['reason']}")
    return 0


def _day(text: str) -> str:
    from datetime import date

    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2026-11-25") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enhance-worker", description=__doc__)
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
            type=float,
            default=0.0,
            help=f"share of calls answered with {fault} (0..1)",
        )
    sandbox.set_defaults(func=_cmd_sandbox)

    enhance = sub.add_parser("enhance", help="enqueue one prompt and print the result")
    enhance.add_argument("prompt")
    enhance.add_argument("--versions", type=int, default=1)
    enhance.add_argument("--max-length", type=int, default=None)
    enhance.add_argument("--timeout", type=float, default=120.0)
    enhance.set_defaults(func=_cmd_enhance)

    batch = sub.add_parser("batch", help="enhance every line of a file, with progress")
    batch.add_argument("file", nargs="?", help="one prompt a line, or JSONL with task fields")
    batch.add_argument("--versions", type=int, default=1)
    batch.add_argument("--max-length", type=int, default=None)
    batch.add_argument("--out", default="results.jsonl", help="JSONL results (default %(default)s)")
    batch.add_argument("--resume", metavar="PENDING", help="collect an interrupted batch's jobs")
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

    limits = sub.add_parser("limits", help="show or change the fleet-wide limits at run time")
    limits_sub = limits.add_subparsers(dest="action", required=True)
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
    per_account.add_argument("--reset", action="store_true", help="remove its overrides first")
    per_account.add_argument("--json", action="store_true")
    limits.set_defaults(func=_cmd_limits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
