"""The suite's mutation check: small, plausible bugs, each applied alone to a copy of the
working tree, with the tests that must catch it run against it.

    ./run mutate                 every mutation (about 5 minutes on 2 cores)
    ./run mutate --list          the mutations, the promise each breaks and its tests
    ./run mutate NAME [NAME...]  only those

A mutation is *caught* when one of its tests fails; *survived* when they all pass, which
makes the command exit 1. Before any mutation, the tests named run once against the
unchanged copy: a test that fails there proves nothing, and the run stops. A mutation whose
text is no longer in its file is reported as *stale* (exit 1), so the list follows the code.

The rule (CONTRIBUTING.md): a change that makes a new promise, or a test that guards one,
adds a mutation here that its test catches. The working tree is never modified: each run
works in a temporary copy, with that copy first on PYTHONPATH (also for the worker
processes the tests start).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.pyc"
)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    promise: str  # what the README promises that the mutation breaks
    tests: tuple[str, ...]  # pytest node ids; at least one must fail


_E = "tests/integration/test_errors_and_retries.py::"
_L = "tests/integration/test_limiter_redis.py::"
_W = "tests/integration/test_webhooks.py::"
_T = "tests/integration/test_tracing.py::"
_P = "tests/unit/test_policy.py::"
_O = "tests/integration/test_operations.py::"

MUTATIONS: tuple[Mutation, ...] = (
    # --- the five the audit found the suite letting through ---------------------------------
    Mutation(
        "refused-call-keeps-reservation",
        "tasks/policy.py",
        '    if isinstance(exc, PermanentError):\n        return "release"\n',
        '    if isinstance(exc, PermanentError):\n        return "keep"\n',
        "a call Runware refuses gives its budget reservation back",
        (
            _E + "test_a_call_runware_refuses_gives_its_budget_reservation_back",
            _P + "test_a_call_that_fails_leaves_its_reservation_as_the_policy_says",
        ),
    ),
    Mutation(
        "retry-ignores-retry-after",
        "tasks/policy.py",
        "            exc.retry_after,\n            self.retry_after_max_s,",
        "            None,\n            self.retry_after_max_s,",
        "a retry waits at least Retry-After",
        (
            _P + "test_a_retry_waits_at_least_retry_after_itself_capped",
            _E + "test_a_500_with_retry_after_is_retried_no_sooner",
            _E + "test_retry_after_is_honoured",
        ),
    ),
    Mutation(
        "error-text-unmasked",
        "tasks/runware.py",
        "return (str(code) if code else None), self.redact(text)",
        "return (str(code) if code else None), text",
        "the API key is masked where Runware echoes it",
        ("tests/integration/test_secrets.py::test_the_key_leaks_nowhere",),
    ),
    Mutation(
        "cost-on-the-day-it-ends",
        "tasks/lua/ledger_lib.lua",
        "local day = prefix .. ':day:' .. ((entry and entry.d) or today)",
        "local day = prefix .. ':day:' .. today",
        "a cost goes on the UTC day its call started",
        (
            "tests/integration/test_ledger_redis.py::"
            "test_a_call_that_ends_after_midnight_is_booked_on_the_day_it_started",
        ),
    ),
    Mutation(
        "marker-field-lowercase-only",
        "tasks/ledger.py",
        'r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-',
        'r"[0-9a-f]{8}-[0-9a-fA-F]{4}-',
        "a billed-once marker is found by the field earlier versions wrote",
        (
            "tests/integration/test_ledger_redis.py::"
            "test_a_marker_field_is_the_one_earlier_versions_wrote",
        ),
    ),
    Mutation(
        "marker-field-prefix-match",
        "tasks/ledger.py",
        "    if _UUID_FORM.fullmatch(task_uuid):",
        "    if _UUID_FORM.match(task_uuid):",
        "a billed-once marker is found by the field earlier versions wrote",
        (
            "tests/integration/test_ledger_redis.py::"
            "test_a_marker_field_is_the_one_earlier_versions_wrote",
        ),
    ),
    Mutation(
        "dispatcher-lock-outlives-its-holder",
        "tasks/dispatcher.py",
        "LOCK_MS = 3000",
        "LOCK_MS = 600000",
        "a dead dispatcher's role is taken over within about 3 s",
        (
            "tests/integration/test_limits.py::"
            "test_a_killed_dispatchers_role_is_taken_over_by_its_lock_expiring",
        ),
    ),
    # --- the ledger ---------------------------------------------------------------------------
    Mutation(
        "cost-booked-at-every-end",
        "tasks/lua/ledger_lib.lua",
        "  if recorded or not first_billing(cost, billed_ttl, field) then return 0 end",
        "  first_billing(cost, billed_ttl, field)",
        "a call's cost is counted once, however many times it ends",
        ("tests/integration/test_cost.py::test_a_call_ended_twice_is_counted_once",),
    ),
    Mutation(
        "marker-looked-up-by-its-text",
        "tasks/lua/ledger_lib.lua",
        "    if redis.call('HEXISTS', name .. n, field) == 1 then return false end",
        "    if redis.call('HEXISTS', name .. n, uuid) == 1 then return false end",
        "a resend after the items went is still counted once (the marker's field is the UUID's "
        "bytes, and the lookup must use the same form)",
        (
            "tests/integration/test_money.py::"
            "test_a_resend_gets_the_items_and_is_counted_once_before_and_after_they_go",
        ),
    ),
    Mutation(
        "budget-ignores-the-calls-estimate",
        "tasks/lua/ledger_begin.lua",
        "  if spent + estimate > fleet_budget then",
        "  if spent > fleet_budget then",
        "a call that would pass the daily budget is refused before it is made",
        ("tests/integration/test_cost.py::test_a_budget_reserves_every_version",),
    ),
    Mutation(
        "given-up-call-not-handed-to-the-reconciler",
        "tasks/ledger.py",
        "{task_uuid: now}, xx=True)",
        "{task_uuid: now + 3600}, xx=True)",
        "a call its job gave up on is settled by the reconciler within about a period",
        (
            "tests/integration/test_money.py::"
            "test_calls_their_jobs_gave_up_on_are_settled_by_the_reconciler",
        ),
    ),
    # --- the fair intake (pump*.lua) ----------------------------------------------------------
    Mutation(
        "fair-entry-loses-its-tag",
        "tasks/lua/pump_lib.lua",
        "  return since .. '|' .. #id .. '|' .. #tag .. '|' .. id .. tag .. raw",
        "  return since .. '|' .. #id .. '|0|' .. id .. raw",
        "a granted job's slot is named by its delivery tag, kept in its fair list's entry",
        ("tests/integration/test_pump_lib.py::test_a_fair_list_entry_gives_back_what_went_in",),
    ),
    Mutation(
        "pump-key-misnamed",
        "tasks/dispatcher.py",
        '        "hooked": keys.hooked,',
        '        "hook": keys.hooked,',
        "the dispatcher hands the step each key under the name the script reads it by",
        (
            "tests/unit/test_pump_parts.py::"
            "test_the_dispatcher_names_every_key_and_argument_the_script_declares",
        ),
    ),
    Mutation(
        "rate-too-slow",
        "tasks/lua/pump_fair.lua",
        "  local interval = 1 / r\n",
        "  local interval = 1.6 / r\n",
        "the fleet calls at the configured rate",
        (_L + "test_a_rate_spaces_grants_evenly",),
    ),
    Mutation(
        "in-flight-cap-off-by-one",
        "tasks/lua/pump_fair.lua",
        "if in_flight >= capacity or in_flight + busy >= threads then return -2 end",
        "if in_flight > capacity or in_flight + busy >= threads then return -2 end",
        "never more calls in flight than RUNWARE_MAX_IN_FLIGHT",
        (_L + "test_the_in_flight_cap_holds_below_the_threads",),
    ),
    Mutation(
        "retries-jump-the-queue",
        "tasks/lua/pump_intake.lua",
        "local push = (was_delayed and string.sub(code, 3, 3) == '1') and 'LPUSH' or 'RPUSH'",
        "local push = was_delayed and 'LPUSH' or 'RPUSH'",
        "a retry queues behind its account's waiting jobs (only a poll goes ahead)",
        (
            "tests/integration/test_fairness.py::"
            "test_failing_jobs_retry_behind_the_jobs_that_have_not_started",
        ),
    ),
    Mutation(
        "batch-starves-behind-interactive",
        "tasks/lua/pump_grant.lua",
        "if has_i and (not has_b or streak < max_streak) then",
        "if has_i then",
        "batch jobs keep one grant in ten while interactive ones wait",
        (_L + "test_interactive_goes_first_but_batch_keeps_one_slot_in_ten",),
    ),
    Mutation(
        "request-held-the-whole-window",
        "tasks/batching.py",
        "        return self.window_s if took is None else min(self.window_s, HOLD_SHARE * took)",
        "        return self.window_s",
        "against a fast API a request is not held open for the whole window",
        (
            "tests/unit/test_batching.py::"
            "test_a_request_is_held_no_longer_than_a_share_of_what_requests_take",
        ),
    ),
    Mutation(
        "intake-events-one-message-each",
        "workers/events.py",
        '                    buffer_group=["task"],\n',
        "",
        "a dispatcher step's task-sent events leave in one message",
        (_O + "test_task_events_leave_together_and_none_is_lost",),
    ),
    Mutation(
        "granted-jobs-announced-as-waiting",
        "tasks/dispatcher.py",
        "j.kind != messages.CALL or j.task_id not in granted]",
        "j.kind != messages.CALL or j.task_id not in granted or True]",
        "a task-sent event only for the jobs a dispatcher step leaves waiting",
        (_O + "test_task_events_leave_together_and_none_is_lost",),
    ),
    Mutation(
        "waiting-jobs-not-announced",
        "tasks/dispatcher.py",
        "j.kind != messages.CALL or j.task_id not in granted]",
        "j.kind != messages.CALL or j.task_id in granted]",
        "Flower sees the jobs that wait in the fair intake",
        (_O + "test_task_events_leave_together_and_none_is_lost",),
    ),
    Mutation(
        "worker-events-flushed-every-turn",
        "workers/consumer.py",
        "        hub.call_soon(self._arm_events_flush)",
        "        hub.call_soon(self._flush_armed_events)",
        "the worker's task events are published a flush window at a time",
        (
            _O + "test_task_events_leave_together_and_none_is_lost",
            "tests/unit/test_consumer_events.py::"
            "test_events_buffered_together_leave_in_one_flush_a_window_later",
        ),
    ),
    Mutation(
        "buffered-events-lost-on-reconnect",
        "workers/consumer.py",
        "        self._flush_armed_events()\n        super().on_close()",
        "        super().on_close()",
        "task events buffered when the broker connection is lost are still published",
        (
            "tests/unit/test_consumer_events.py::"
            "test_what_is_buffered_goes_out_before_the_consumer_is_torn_down",
        ),
    ),
    Mutation(
        "buffered-events-lost-at-shutdown",
        "workers/consumer.py",
        "        self._flush_armed_events()\n        super().shutdown()",
        "        super().shutdown()",
        "task events of jobs that finish as the worker stops are published",
        (
            "tests/unit/test_consumer_events.py::"
            "test_what_is_buffered_goes_out_when_the_consumer_shuts_down",
        ),
    ),
    Mutation(
        "lost-events-flush-never-armed-again",
        "workers/consumer.py",
        "        if hub is None or now < self._events_flush_due:",
        "        if hub is None or self._events_flush_due:",
        "task events never stay buffered for good after the broker connection was lost",
        (
            "tests/unit/test_consumer_events.py::test_a_flush_lost_with_the_loops_timer_is_armed_again",
        ),
    ),
    Mutation(
        "runware-cookies-not-sent-back",
        "tasks/runware.py",
        "            if self.session.cookies:",
        "            if False:",
        "a cookie Runware's front sets is sent back, as requests sends it",
        (
            "tests/unit/test_runware_client.py::"
            "test_the_calls_go_through_the_proxy_the_environment_names",
        ),
    ),
    Mutation(
        "keys-newline-kept",
        "config/settings.py",
        "        key = value.get_secret_value().strip()\n",
        "        key = value.get_secret_value()\n",
        "a key's trailing newline (a secret file's) is not part of it",
        (
            "tests/unit/test_settings.py::"
            "test_a_keys_trailing_newline_is_dropped_and_a_stray_character_refused",
        ),
    ),
    Mutation(
        "proxy-from-environment-ignored",
        "tasks/runware.py",
        "self.session.merge_environment_settings(self._url, {}, None, None, None)",
        "{'proxies': {}}",
        "the Runware calls go through the proxy HTTP(S)_PROXY names",
        (
            "tests/unit/test_runware_client.py::"
            "test_the_calls_go_through_the_proxy_the_environment_names",
        ),
    ),
    # --- the retry policy ---------------------------------------------------------------------
    Mutation(
        "one-retry-too-many",
        "tasks/policy.py",
        "        return retries >= self.limit",
        "        return retries > self.limit",
        "a job is tried 1 + RUNWARE_MAX_RETRIES times, then fails with its reason",
        (
            _P + "test_the_last_attempt_gives_up_with_the_retry_count",
            "tests/integration/test_fairness.py::"
            "test_failing_jobs_retry_behind_the_jobs_that_have_not_started",
        ),
    ),
    Mutation(
        "client-errors-retried",
        "tasks/errors.py",
        "    return PermanentError(message, code=code, status=status)",
        "    return TransientError(message, code=code, status=status)",
        "a request Runware refuses (4xx) fails at once, with no retry",
        (_E + "test_permanent_errors_fail_at_once_keeping_code_and_message",),
    ),
    # --- the interactive path -----------------------------------------------------------------
    Mutation(
        "lone-request-waits-the-window",
        "tasks/batching.py",
        "                        and ((now := time.monotonic()) < sure or self._others_coming())\n",
        "",
        "a lone or serial request never waits for the batching window",
        ("tests/unit/test_batching.py::test_serial_calls_never_wait_for_the_window",),
    ),
    Mutation(
        "held-for-calls-that-cannot-come",
        "tasks/batching.py",
        "        if self._sending > 0 and mean < self.window_s / 2:",
        "        if mean < self.window_s / 2:",
        "a serial client's request is never held for calls not on their way (only under load)",
        (
            "tests/unit/test_batching.py::"
            "test_only_a_process_under_load_waits_for_calls_not_on_their_way",
        ),
    ),
    Mutation(
        "wait-misses-a-result-stored-before-it",
        "enhance_client/waiting.py",
        "                self._read_soon(key)\n                return await future",
        "                return await future",
        "a wait sees a result stored before it began at once",
        (
            "tests/integration/test_waiting.py::"
            "test_a_result_stored_while_a_wait_subscribes_is_not_missed",
        ),
    ),
    Mutation(
        "timeout-without-the-task-id",
        "enhance_client/waiting.py",
        'f"task {task_id} was not ready',
        'f"the task was not ready',
        "a wait's timeout names the task id (the job goes on)",
        (
            "tests/integration/test_waiting.py::"
            "test_a_timeout_names_the_task_and_cancelling_leaves_the_job",
        ),
    ),
    # --- the masking --------------------------------------------------------------------------
    Mutation(
        "query-strings-shown",
        "enhance_client/masking.py",
        '    text = _URL_QUERY.sub(r"\\1?<redacted>", text)',
        "    text = text",
        "webhook tokens (URL query strings) are masked in logs and Flower",
        (
            "tests/unit/test_redact.py::test_query_strings_and_credentials_are_masked",
            "tests/integration/test_operations.py::test_flower_shows_each_job_with_its_result",
        ),
    ),
    Mutation(
        "url-passwords-shown",
        "enhance_client/masking.py",
        '    return _URL_USERINFO.sub(r"\\1<redacted>@", text)',
        "    return text",
        "a Redis URL's password is masked wherever a URL is shown",
        ("tests/unit/test_redact.py::test_query_strings_and_credentials_are_masked",),
    ),
    Mutation(
        "foreign-producers-reprs-shown",
        "tasks/redact.py",
        "            setattr(request, name, redact(value))",
        "            setattr(request, name, value)",
        "a job sent by any producer shows Flower its arguments masked",
        ("tests/integration/test_operations.py::test_flower_shows_each_job_with_its_result",),
    ),
    Mutation(
        "webhook-token-unchecked",
        "tasks/webhooks.py",
        '    return hmac.compare_digest(wanted, given.encode("utf-8", "replace"))',
        "    return True",
        "a webhook POST without the call's token changes nothing",
        (_W + "test_a_post_without_a_valid_token_changes_nothing",),
    ),
    Mutation(
        "woken-poll-takes-a-grant",
        "tasks/lua/pump_intake.lua",
        "if tonumber(hooked) > now then kind, was_delayed, due = 'p', true, nil end",
        "if tonumber(hooked) > now then was_delayed, due = true, nil end",
        "a job finished by its webhook takes no rate slot for it",
        (_W + "test_videos_are_finished_by_the_webhook_within_two_seconds",),
    ),
    Mutation(
        "woken-poll-keeps-its-eta",
        "config/transport.py",
        '            headers["eta"] = None\n',
        "            pass\n",
        "a job is finished within seconds of its webhook, not at its next poll",
        (_W + "test_videos_are_finished_by_the_webhook_within_two_seconds",),
    ),
    Mutation(
        "callers-webhook-url-replaced",
        "tasks/webhooks.py",
        'if base is None or secret is None or body.get("webhookURL"):',
        "if base is None or secret is None:",
        "a caller's own webhookURL is kept (that call polls)",
        (_W + "test_a_callers_own_webhook_url_is_kept_and_the_call_polls",),
    ),
    Mutation(
        "passed-run-calls-without-a-grant",
        "tasks/limiter.py",
        "        return self.redis.zscore(self.keys.busy, delivery_tag) is not None",
        "        return False",
        "a run passed without a grant makes no call to Runware",
        (_W + "test_a_run_passed_without_a_grant_makes_no_call",),
    ),
    Mutation(
        "early-webhook-waits-for-the-poll",
        "tasks/lua/pump_intake.lua",
        "  local hooked = continues and redis.call('ZSCORE', K.hooked, id)",
        "  local hooked = continues and was_delayed and redis.call('ZSCORE', K.hooked, id)",
        "a webhook that comes before the job's poll is parked still ends the job at once",
        (_W + "test_a_webhook_before_the_poll_is_parked_ends_the_job_at_once",),
    ),
    Mutation(
        "last-attempt-keeps-reservation",
        "tasks/policy.py",
        '        return "give up" if last_attempt else "keep"',
        '        return "keep"',
        "a call whose job gives up is left to the reconciler (Runware may have billed it)",
        (_P + "test_a_call_that_fails_leaves_its_reservation_as_the_policy_says",),
    ),
    # --- production sizes -------------------------------------------------------------------
    Mutation(
        "any-state-compressed",
        "config/backend.py",
        "        if state == states.SUCCESS:",
        "        if True:",
        "only a SUCCESS is stored compressed: the store script reads the marked form as SUCCESS, "
        "so a compressed RETRY would never be replaced by the job's result",
        (
            "tests/integration/test_hot_path.py::"
            "test_the_app_writes_results_through_the_one_trip_store",
        ),
    ),
    Mutation(
        "compressed-success-replaced",
        "config/backend.py",
        "  if string.byte(current, 1) == 0 then return 0 end\n",
        "",
        "a stored SUCCESS, compressed, is never replaced by a redelivered copy's late state",
        (
            "tests/integration/test_hot_path.py::"
            "test_the_app_writes_results_through_the_one_trip_store",
        ),
    ),
    Mutation(
        "compression-cannot-be-turned-off",
        "config/settings.py",
        '            return None if value in ("", "none") else value',
        "            return value or None",
        "CELERY_RESULT_COMPRESSION=none stores results as plain JSON (readers on an older Celery)",
        ("tests/unit/test_settings.py::test_results_are_compressed_unless_none_is_asked",),
    ),
    Mutation(
        "large-result-stored-raw",
        "config/backend.py",
        "            if len(value) > LARGE_RESULT_BYTES:",
        "            if False:",
        "a result over a mebibyte (a batch's) is stored compressed, so no Redis call holds the "
        "server for its size",
        (
            "tests/integration/test_hot_path.py::"
            "test_a_result_over_a_mebibyte_is_stored_compressed_and_read_as_it_was",
        ),
    ),
    Mutation(
        "batch-callback-uncompressed",
        "tasks/pipelines.py",
        "    return collect_batch.s().set(compression=CALLBACK_COMPRESSION)",
        "    return collect_batch.s()",
        "a batch's callback message, which carries every result, is sent compressed",
        (
            "tests/unit/test_messages.py::"
            "test_a_batch_callback_goes_compressed_and_is_taken_in_without_decoding_its_body",
        ),
    ),
    # --- tracing ----------------------------------------------------------------------------
    Mutation(
        "span-without-the-cost",
        "tasks/base.py",
        '    return {"runware.status": "success", "runware.cost_usd": outcome.cost}',
        '    return {"runware.status": "success"}',
        "each Runware call's span carries the call's cost in USD",
        (_T + "test_a_job_sent_by_name_is_one_trace_down_to_its_runware_call",),
    ),
    Mutation(
        "intake-wait-not-in-the-trace",
        "tasks/dispatcher.py",
        "                    self._waits.taken_in(job.task_id, job.traceparent)",
        "                    pass",
        "the wait in the fair intake is a span of the job's trace",
        (_T + "test_a_job_sent_by_name_is_one_trace_down_to_its_runware_call",),
    ),
    Mutation(
        "secrets-reach-the-exporter",
        "tasks/trace_export.py",
        "        return self.inner.export([self._copy(span) for span in spans])",
        "        return self.inner.export(list(spans))",
        "no secret is in any span, event or resource exported",
        ("tests/unit/test_tracing.py::test_no_secret_reaches_the_exporter",),
    ),
    Mutation(
        "helpers-drop-the-trace",
        "tasks/tracing.py",
        "    propagate.inject(headers, context=otel_context.get_current())",
        "    return",
        "the project's helpers carry the producer's trace in the `traceparent` header",
        (_T + "test_the_projects_helpers_carry_the_producers_trace",),
    ),
    Mutation(
        "logs-without-trace-ids",
        "workers/logs.py",
        "            record.trace_id, record.span_id = ids",
        "            pass",
        "log lines written inside a span carry its trace and span ids",
        (_T + "test_a_job_sent_by_name_is_one_trace_down_to_its_runware_call",),
    ),
    Mutation(
        "fleet-gauges-wait-for-a-call",
        "workers/metrics.py",
        "        if call_s is not None:  # no call measured yet",
        "        if call_s is None:\n            return\n        if True:  #",
        "a worker that has made no call (a fleet paused from the start) still reports the "
        "fleet's paused and cool-down gauges",
        (
            "tests/integration/test_operations.py::"
            "test_the_autoscaling_signal_follows_the_rate_not_the_backlog",
        ),
    ),
    Mutation(
        "scale-on-the-backlog",
        "workers/metrics.py",
        "        usable = min(usable, math.ceil(rate * call_s))",
        "        pass",
        "the autoscaling signal counts the threads the rate can use, not the backlog",
        (
            "tests/integration/test_operations.py::"
            "test_the_autoscaling_signal_follows_the_rate_not_the_backlog",
        ),
    ),
)


def _copy() -> Path:
    target = Path(tempfile.mkdtemp(prefix="enhance-mutate-")) / "tree"
    shutil.copytree(ROOT, target, ignore=IGNORED)
    return target


def _pytest(tree: Path, tests: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, time.monotonic() - began, lines[-1] if lines else done.stderr[-300:]


def _check_the_copy_is_imported(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    found = subprocess.run(
        [sys.executable, "-c", "import tasks, enhance_client; print(tasks.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not found.startswith(str(tree)):
        raise SystemExit(f"mutate: the copy is not what Python imports ({found})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run mutate", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and stop")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"no mutation named {', '.join(unknown)} (see --list)")
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.path})\n  promise: {m.promise}")
            for test in m.tests:
                print(f"  test: {test}")
        return 0
    tree = _copy()
    try:
        _check_the_copy_is_imported(tree)
        union = sorted({t for m in chosen for t in m.tests})
        code, took, last = _pytest(tree, union)
        print(f"unmutated: {len(union)} tests {'pass' if code == 0 else 'FAIL'} ({took:.1f}s)")
        if code != 0:
            print(f"  {last}\nmutate: the tests must pass unmutated first", file=sys.stderr)
            return 2
        bad = 0
        for m in chosen:
            file = tree / m.path
            original = file.read_text()
            if original.count(m.old) != 1:
                print(f"STALE     {m.name}: its text is in {m.path} {original.count(m.old)} times")
                bad += 1
                continue
            file.write_text(original.replace(m.old, m.new))
            try:
                code, took, last = _pytest(tree, list(m.tests))
            finally:
                file.write_text(original)
            # Caught: a test failed (not an error in a fixture or at collection).
            caught = code == 1 and " failed" in last and " error" not in last
            verdict = "caught" if caught else ("SURVIVED" if code == 0 else f"ERROR({code})")
            bad += verdict != "caught"
            print(f"{verdict:9} {m.name} ({took:.1f}s): {last}")
        print(f"{len(chosen) - bad} of {len(chosen)} mutations caught")
        return 1 if bad else 0
    finally:
        shutil.rmtree(tree.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
