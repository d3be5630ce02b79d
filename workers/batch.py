"""`enhance-worker batch FILE`: enqueue one job per line, show progress, write results as they
arrive, print totals. Ctrl-C leaves the queued jobs running and says how to collect them."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from celery import Celery

from tasks.errors import ValidationError
from tasks.ledger import MICRO, to_micro
from tasks.schemas import parse_enhance, summarize

BAR_WIDTH = 24


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

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        filled = int(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} {rate:.1f}/s ETA {eta} "
            f"failed {self.failed} cost ${self.cost_micro / MICRO:.6f}"
        )
        self.stream.flush()


def read_prompts(path: Path, versions: int, max_length: int | None) -> list[dict[str, Any]]:
    """Job arguments from a file: one prompt a line, or JSONL objects of task fields.
    Every line is validated before anything is enqueued."""
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
            arguments.setdefault("priority", "batch")
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
) -> int:
    """Wait for `pending` (index, task id, prompt) jobs, appending each result to `out` as it
    arrives. Returns the exit status; on Ctrl-C writes `out`.pending and says how to resume."""
    progress = Progress(total=total, stream=progress_stream)
    progress.done = total - len(pending)
    by_id = {task_id: (index, prompt) for index, task_id, prompt in pending}
    remaining = dict(by_id)
    try:
        with out.open("a", encoding="utf-8") as results:
            for task_id, meta in app.backend.get_many(  # type: ignore[attr-defined]
                list(by_id), interval=0.05, on_interval=progress.draw
            ):
                index, prompt = remaining.pop(task_id)
                line: dict[str, Any] = {"index": index, "prompt": prompt, "taskId": task_id}
                if meta["status"] == "SUCCESS":
                    value = meta["result"]
                    line["result"] = value
                    progress.cost_micro += to_micro(float(value.get("cost") or 0))
                else:
                    error = meta.get("result")
                    line["error"] = (
                        f"{error.get('exc_type')}: {error.get('exc_message')}"
                        if isinstance(error, dict)
                        else str(error)
                    )
                    progress.failed += 1
                results.write(json.dumps(line) + "\n")
                results.flush()
                progress.done += 1
                progress.draw()
    except KeyboardInterrupt:
        progress.draw(force=True)
        pending_file = out.with_name(out.name + ".pending")
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
    progress_stream.write(
        f"\nDone: {progress.done - progress.failed} succeeded, {progress.failed} failed, "
        f"total cost ${progress.cost_micro / MICRO:.6f}; results in {out}\n"
    )
    return 1 if progress.failed else 0


def enqueue(app: Celery, jobs: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    from tasks.enhancement import enhance_prompt

    return [
        (index, str(enhance_prompt.apply_async(kwargs=job).id), job["prompt"])
        for index, job in enumerate(jobs)
    ]


def read_pending(path: Path) -> list[tuple[int, str, str]]:
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(e["index"], e["taskId"], e["prompt"]) for e in entries]
