"""The command line as a new user meets it: no lost results, one-line errors, no silent waits.

Every test runs `enhance-worker` (or `celery ... flower`) as a real process against a private
redis-server, real workers and the sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import RunningWorker, StartWorker, run_cli, wait_until
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, free_port

CLI = (sys.executable, "-m", "workers.cli")
COMMANDS = [
    ["enhance", "a red fox"],
    ["batch", "prompts.txt"],
    ["cost"],
    ["failed", "list"],
    ["limits", "show"],
    ["reconcile", "--timeout", "1"],
]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _one_line(stderr: str) -> str:
    """The single line a failed command printed (it must be exactly one)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- losing work ---------------------------------------------------------------------------------
def test_a_second_batch_appends_to_the_results_file(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("one\ntwo\n")
    out = tmp_path / "results.jsonl"
    out.write_text('{"index": 0, "taskId": "from-an-earlier-batch"}\n')
    done = run_cli(main_worker.redis_url, "batch", str(source), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "(it already holds 1 line)" in done.stderr
    again = run_cli(main_worker.redis_url, "batch", str(source), "--out", str(out))
    assert again.returncode == 0, again.stderr
    results = _lines(out)
    assert results[0]["taskId"] == "from-an-earlier-batch"
    assert len(results) == 5
    assert len({r["taskId"] for r in results}) == 5


def test_a_resume_collects_each_result_once(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    jobs = [main_worker.send(prompt=f"resume me {n}") for n in range(4)]
    pending = tmp_path / "out.jsonl.pending"
    pending.write_text(
        "".join(
            json.dumps({"index": n, "taskId": job.id, "prompt": f"resume me {n}"}) + "\n"  # type: ignore[attr-defined]
            for n, job in enumerate(jobs)
        )
    )
    out = tmp_path / "out.jsonl"
    # One result is already in the file (an interrupted run wrote it before Ctrl-C).
    out.write_text(json.dumps({"index": 0, "taskId": jobs[0].id, "result": {}}) + "\n")  # type: ignore[attr-defined]
    first = run_cli(main_worker.redis_url, "batch", "--resume", str(pending), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "Collecting 3 jobs (1 already in" in first.stderr
    assert sorted(r["index"] for r in _lines(out)) == [0, 1, 2, 3]  # type: ignore[type-var]
    assert not pending.exists()
    second = run_cli(main_worker.redis_url, "batch", "--resume", str(pending), "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "Nothing left to collect" in second.stderr
    assert len(_lines(out)) == 4
    # A pending file whose jobs are all in --out already: the same, and the file goes.
    pending.write_text(json.dumps({"index": 1, "taskId": jobs[1].id, "prompt": "x"}) + "\n")  # type: ignore[attr-defined]
    third = run_cli(main_worker.redis_url, "batch", "--resume", str(pending), "--out", str(out))
    assert "Nothing left to collect" in third.stderr
    assert not pending.exists()
    assert len(_lines(out)) == 4


# --- one-line errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_bad_setting_is_one_line_for_every_command(
    command: list[str], redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    done = run_cli(
        redis_server.url(15), *command, cwd=tmp_path, env_extra={"RUNWARE_TIMEOUT_S": "abc"}
    )
    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert line.startswith("enhance-worker: invalid configuration: RUNWARE_TIMEOUT_S='abc'")
    verbose = run_cli(
        redis_server.url(15), "-v", *command, cwd=tmp_path, env_extra={"RUNWARE_TIMEOUT_S": "abc"}
    )
    assert verbose.returncode == 2
    assert "Traceback" in verbose.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_no_redis_is_one_line_naming_the_url(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    url = f"redis://127.0.0.1:{free_port()}/3"
    # (The timeout only keeps a hang from stalling the suite; Celery's own retries took 20 s.)
    done = run_cli(url, *command, cwd=tmp_path, timeout=15)
    assert done.returncode == 3
    line = _one_line(done.stderr)
    assert f"no Redis answers at {url}" in line
    assert "set REDIS_URL" in line


def test_no_worker_means_nothing_enqueued(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url(14)
    client = redis.Redis.from_url(url)
    client.flushdb()
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    for command in (["enhance", "a red fox"], ["batch", "prompts.txt"]):
        done = run_cli(url, *command, cwd=tmp_path, timeout=30)
        assert done.returncode == 4, done.stderr
        line = _one_line(done.stderr)
        assert "no worker is running" in line
        assert "nothing was enqueued" in line
        assert "celery -A workers worker" in line
    assert client.llen("celery") == 0
    assert client.dbsize() == 0


def test_a_failed_job_and_a_spent_budget_are_one_line(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = start_worker("clifail", RUNWARE_BATCH_MAX="1")
    sandbox.configure(fail_next=["400"])
    failed = run_cli(worker.redis_url, "enhance", "a red fox")
    assert failed.returncode == 1
    assert "the job failed: PermanentError: " in _one_line(failed.stderr)
    assert "HTTP 400" in failed.stderr
    broke = start_worker("clibudget", RUNWARE_DAILY_BUDGET_USD="0")
    spent = run_cli(broke.redis_url, "enhance", "a red fox")
    assert spent.returncode == 5
    assert "a daily budget is spent" in _one_line(spent.stderr)


def test_the_batch_summary_groups_failures_by_reason(
    start_worker: StartWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    worker = start_worker("clisummary", RUNWARE_BATCH_MAX="1")
    sandbox.configure(fail_next=["400", "402", "400"])
    source = tmp_path / "p.txt"
    source.write_text("".join(f"prompt {n}\n" for n in range(6)))
    done = run_cli(worker.redis_url, "batch", str(source), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 1
    assert "Done: 3 succeeded, 3 failed" in done.stderr
    assert "Failures by reason:\n  2x PermanentError: Runware promptEnhance …: HTTP 400" in (
        done.stderr
    )
    assert "  1x PermanentError: Runware promptEnhance …: HTTP 402" in done.stderr


# --- no silent waits -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_batch_says_when_its_workers_are_gone(
    start_worker: StartWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    worker = start_worker("cligone", WORKER_CONCURRENCY="2")
    sandbox.configure(latency_s=0.3)
    source = tmp_path / "p.txt"
    source.write_text("".join(f"slow {n}\n" for n in range(40)))
    out, err = tmp_path / "o.jsonl", tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        process = subprocess.Popen(
            [*CLI, "batch", str(source), "--out", str(out), "--stall-after", "1"],
            env={**os.environ, "REDIS_URL": worker.redis_url},
            stderr=stderr,
            stdout=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 30, "2 results")
        worker.process.kill()
        wait_until(lambda: "No worker is running" in err.read_text(), 60, "the stall line")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    text = err.read_text()
    assert "jobs left wait in Redis, and run (and are billed) when a worker starts" in text
    assert f"enhance-worker batch --resume {out}.pending --out {out}" in text


# --- mistakes that passed silently ----------------------------------------------------------------
def test_flower_refuses_an_auth_entry_without_a_colon(redis_server: RedisServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={free_port()}"],
        env={**os.environ, "REDIS_URL": redis_server.url(15), "FLOWER_BASIC_AUTH": "justuser"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "FLOWER_BASIC_AUTH='<hidden>' is not accepted (entry 1 is not user:password" in (
        done.stderr
    )
    assert "justuser" not in done.stderr + done.stdout


def test_a_worker_without_a_key_warns_at_start(start_worker: StartWorker) -> None:
    worker = start_worker("nokey", RUNWARE_API_KEY="")
    assert "WARNING" in worker.process.log()
    assert "RUNWARE_API_KEY is not set: this worker makes no call" in (worker.process.log())


def test_the_sandbox_command_refuses_mistakes_in_one_line(tmp_path: Path) -> None:
    share = run_cli("redis://127.0.0.1:1/0", "sandbox", "--rate-429", "2", timeout=30)
    assert share.returncode == 2
    assert "argument --rate-429: must be a share of calls from 0 to 1 (got 2)" in share.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli("redis://127.0.0.1:1/0", "sandbox", "--port", str(port), timeout=30)
    assert taken.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in _one_line(taken.stderr)


def test_limits_show_a_rate_in_the_unit_it_was_set_in(redis_server: RedisServer) -> None:
    url = redis_server.url(13)
    done = run_cli(url, "limits", "global", "--rate", "20/m")
    assert done.returncode == 0, done.stderr
    assert "rate: 20/m (override)" in done.stdout
    run_cli(url, "limits", "global", "--reset", check=True)


def test_enhance_and_batch_take_an_account_and_a_priority(
    start_worker: StartWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    worker = start_worker("cliacct")
    done = run_cli(worker.redis_url, "enhance", "a red fox", "--account", "acme")
    assert done.returncode == 0, done.stderr
    source = tmp_path / "p.txt"
    source.write_text("one\ntwo\n")
    batch = run_cli(
        worker.redis_url,
        "batch",
        str(source),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--account",
        "globex",
        "--priority",
        "interactive",
    )
    assert batch.returncode == 0, batch.stderr
    cost = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    assert cost["by_account"] == {"acme": 0.0013, "globex": 0.0026}
    sent = list(sandbox.state.bodies.values())
    assert len(sent) == 3  # the sandbox saw the calls, with no account or priority in them
    assert all("account" not in task and "priority" not in task for task in sent)


# --- output --------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_progress_bar_in_a_real_terminal(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    """The bar redrawn in place in tmux leaves no characters of a longer earlier draw."""
    source = tmp_path / "p.txt"
    source.write_text("".join(f"term {n}\n" for n in range(30)))
    session = f"enhance-cli-{os.getpid()}"
    command = (
        f"REDIS_URL={main_worker.redis_url} {sys.executable} -m workers.cli batch {source} "
        f"--out {tmp_path / 'o.jsonl'}; echo EXIT=$?; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "20", command],
        check=True,
        cwd=tmp_path,
    )
    try:

        def screen() -> str:
            return subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        wait_until(lambda: "EXIT=0" in screen(), 60, "the batch's end in tmux")
        lines = [line.rstrip() for line in screen().splitlines() if line.strip()]
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    bar = next(line for line in lines if line.startswith("[####"))
    assert bar.startswith("[########################] 30/30 ")
    assert bar.endswith("failed 0 cost $0.039000"), bar  # nothing left over after the figure
    assert any(line.startswith("Done: 30 succeeded, 0 failed") for line in lines)


def test_the_run_script_prints_its_help_without_code() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["bash", str(root / "run")], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0
    assert "./run demo" in done.stdout
    assert "set -euo" not in done.stdout
    assert "#" not in done.stdout


def test_a_stalled_batch_is_noticed_only_when_no_worker_runs(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    """With a worker running, a slow batch is not reported as abandoned."""
    sandbox.configure(latency_s=0.8)  # (the test worker's RUNWARE_TIMEOUT_S is 1)
    source = tmp_path / "p.txt"
    source.write_text("slow one\n")
    done = run_cli(
        main_worker.redis_url,
        "batch",
        str(source),
        "--out",
        str(tmp_path / "o"),
        "--stall-after",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    assert "No worker is running" not in done.stderr


def test_enhance_that_times_out_says_what_becomes_of_the_job(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = start_worker("clislow", RUNWARE_RATE_LIMIT="1/h")
    first = run_cli(worker.redis_url, "enhance", "the one call this hour")
    assert first.returncode == 0, first.stderr
    done = run_cli(worker.redis_url, "enhance", "a fox that waits", "--timeout", "1")
    assert done.returncode == 4
    line = _one_line(done.stderr)
    assert "no result within 1s for job " in line
    assert "it is still queued or running, and will finish (and be billed)" in line
    assert "CELERY_RESULT_EXPIRES_S" in line
