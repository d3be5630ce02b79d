"""`enhance-worker batch FILE`: enqueue one job per line, show progress, append results to the
`--out` file as they arrive (never truncating it), print totals with the failures' reasons.
Ctrl-C leaves the queued jobs running and says how to collect them; `--resume` collects only
what the `--out` file does not hold yet, so running it twice adds nothing."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from celery import Celery

from enhance_client.schemas import parse_enhance, summarize
from tasks.errors import ValidationError
from tasks.ledger import MICRO, to_micro

BAR_WIDTH = 24
# Seconds without a finished job after which the command checks that a worker still runs
# (`--stall-after`).
STALL_S = 15.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Progress:
    """Counts of a running batch, drawn as one line on a terminal (stderr)."""

    total: int
    stream: TextIO = sys.stderr
    done: int = 0
    failed: int = 0
    cost_micro: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_draw: float = 0.0
    _drawn: int = 0  # length of the line drawn last, to clear what a shorter one leaves

    def draw(self, force: bool = False) -> None:
        """Redraw the bar in place: ten times a second on a terminal, every few seconds into a
        file or pipe (where each redraw stays)."""
        now = time.monotonic()
        every = 0.1 if self.stream.isatty() else 5.0
        if not force and now - self._last_draw < every:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        filled = int(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = (
            f"[{bar}] {self.done}/{self.total} {rate:.1f}/s ETA {eta} "
            f"failed {self.failed} cost ${self.cost_micro / MICRO:.6f}"
        )
        self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self._drawn = len(line)
        self.stream.flush()

    def say(self, text: str) -> None:
        """A line of its own under the bar; the bar is drawn again below it."""
        self.stream.write("\n" + text + "\n")
        self._drawn = 0
        self.draw(force=True)


def _error_text(error: object) -> str:
    """A failed job's error as `Type: message` (the backend gives an exception or its JSON)."""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, dict):
        return f"{error.get('exc_type')}: {error.get('exc_message')}"
    return str(error)


def reason_of(error: str) -> str:
    """A failure's reason with its taskUUIDs left out, so that alike failures group."""
    return _UUID.sub("…", error)


def read_prompts(
    path: Path,
    versions: int,
    max_length: int | None,
    account: str | None = None,
    priority: str = "batch",
) -> list[dict[str, Any]]:
    """Job arguments from a file: one prompt a line, or JSONL objects of task fields (which
    win over the flags). Every line is validated before anything is enqueued."""
    jobs: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                arguments = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not valid JSON ({exc.msg})")
                continue
        else:
            arguments = {"prompt": line.strip()}
        if isinstance(arguments, dict):
            arguments.setdefault("promptVersions", versions)
            arguments.setdefault("priority", priority)
            if account is not None:
                arguments.setdefault("account", account)
            if max_length is not None:
                arguments.setdefault("promptMaxLength", max_length)
        try:
            jobs.append(parse_enhance(arguments).task_kwargs())
        except ValidationError as exc:
            problems.append(f"line {number}: {str(exc).split(': ', 1)[1]}")
    if problems:
        raise ValidationError(f"{path}: {summarize(problems)}")
    return jobs


def run_batch(
    app: Celery,
    pending: list[tuple[int, str, str]],
    total: int,
    out: Path,
    progress_stream: TextIO = sys.stderr,
    workers_running: Callable[[], int] | None = None,
    stall_s: float = STALL_S,
) -> int:
    """Wait for `pending` (index, task id, prompt) jobs, appending each result to `out` as it
    arrives. Returns the exit status; on Ctrl-C writes `out`.pending and says how to resume.
    When nothing finishes for `stall_s` seconds and `workers_running()` finds no worker, says so
    (once per stall) and what happens to the queued jobs."""
    progress = Progress(total=total, stream=progress_stream)
    progress.done = total - len(pending)
    by_id = {task_id: (index, prompt) for index, task_id, prompt in pending}
    remaining = dict(by_id)
    reasons: Counter[str] = Counter()
    pending_file = out.with_name(out.name + ".pending")
    watch = _StallWatch(progress, workers_running, pending_file, out, stall_s)
    try:
        with out.open("a", encoding="utf-8") as results:
            for task_id, meta in app.backend.get_many(  # type: ignore[attr-defined]
                list(by_id), interval=0.05, on_interval=watch.tick
            ):
                index, prompt = remaining.pop(task_id)
                line: dict[str, Any] = {"index": index, "prompt": prompt, "taskId": task_id}
                if meta["status"] == "SUCCESS":
                    value = meta["result"]
                    line["result"] = value
                    progress.cost_micro += to_micro(float(value.get("cost") or 0))
                else:
                    error = meta.get("result")
                    line["error"] = _error_text(error)
                    progress.failed += 1
                    reasons[reason_of(line["error"])] += 1
                results.write(json.dumps(line) + "\n")
                results.flush()
                progress.done += 1
                watch.finished()
                progress.draw()
    except KeyboardInterrupt:
        progress.draw(force=True)
        with pending_file.open("w", encoding="utf-8") as handle:
            for task_id, (index, prompt) in remaining.items():
                handle.write(json.dumps({"index": index, "taskId": task_id, "prompt": prompt}))
                handle.write("\n")
        progress_stream.write(
            f"\nInterrupted: {len(remaining)} job(s) are still queued and will finish. "
            f"Collect their results with:\n"
            f"  enhance-worker batch --resume {pending_file} --out {out}\n"
        )
        return 130
    progress.draw(force=True)
    pending_file.unlink(missing_ok=True)  # everything is collected
    progress_stream.write(
        f"\nDone: {progress.done - progress.failed} succeeded, {progress.failed} failed, "
        f"total cost ${progress.cost_micro / MICRO:.6f}; results in {out}\n"
    )
    if reasons:
        progress_stream.write(
            "Failures by reason:\n"
            + "".join(f"  {count}x {reason}\n" for reason, count in reasons.most_common())
        )
    return 1 if progress.failed else 0


@dataclass
class _StallWatch:
    """Notices a batch that makes no progress because no worker runs."""

    progress: Progress
    workers_running: Callable[[], int] | None
    pending_file: Path
    out: Path
    stall_s: float
    _since: float = field(default_factory=time.monotonic)
    _said: bool = False

    def finished(self) -> None:
        self._since, self._said = time.monotonic(), False

    def tick(self) -> None:
        self.progress.draw()
        if self._said or self.workers_running is None:
            return
        if time.monotonic() - self._since < self.stall_s:
            return
        self._since = time.monotonic()
        if self.workers_running():
            return
        self._said = True
        left = self.progress.total - self.progress.done
        self.progress.say(
            f"No worker is running and nothing finished for {self.stall_s:g}s: the {left} jobs "
            "left wait in Redis, and run (and are billed) when a worker starts. Start one with "
            "`celery -A workers worker`, or press Ctrl-C to stop waiting (they stay queued; "
            f"collect them later with: enhance-worker batch --resume {self.pending_file} "
            f"--out {self.out})."
        )


def enqueue(jobs: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """Send one `tasks.enhance_prompt` job per validated argument set: (index, id, prompt)."""
    from tasks.enhancement import enhance_prompt

    return [
        (index, str(enhance_prompt.apply_async(kwargs=job).id), job["prompt"])
        for index, job in enumerate(jobs)
    ]


def read_pending(path: Path) -> list[tuple[int, str, str]]:
    """The jobs an interrupted batch left: (index, task id, prompt)."""
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(e["index"], e["taskId"], e["prompt"]) for e in entries]


def collected(out: Path) -> set[str]:
    """The task ids whose results `out` already holds."""
    if not out.exists():
        return set()
    ids: set[str] = set()
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("taskId"), str):
            ids.add(entry["taskId"])
    return ids


def results_held(out: Path) -> int:
    """How many lines `out` already holds (0 when it does not exist)."""
    if not out.exists():
        return 0
    with out.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())
