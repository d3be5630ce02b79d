"""The Runware REST client: one requests.Session per process, a timeout on every call, and the
mapping from HTTP status and body to results and errors (the table itself is
tasks/errors.py's `runware_error`).

A client: tasks in, answers and errors out. It knows the wire protocol only. Slots, the
fleet's cool-down, retries, resends and costs belong to the layer above (tasks/base.py,
tasks/limiter.py); that layer also decides which tasks may share a request (`alone`), and the
client never sends a task twice. Concurrent calls of this process's threads share one HTTP
request (tasks/batching.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from config.settings import Settings, get_settings
from enhance_client.masking import mask_urls
from tasks import metrics, tracing
from tasks.batching import Coalescer
from tasks.errors import AuthenticationError, RateLimited, TransientError, runware_error
from tasks.redact import mask, redact

logger = logging.getLogger(__name__)

USER_AGENT = "enhance-worker/0.1 (+celery)"
PENDING_STATUSES = frozenset({"processing", "pending", "queued", "scheduled", "waiting"})
# Task types that share requests (tasks/batching.py): quick ones of even duration. Image and
# video inference go alone, so that one slow generation never holds up another's answer.
BATCHED_TASK_TYPES = frozenset({"promptEnhance", "getResponse"})
# The code of the TransientError for a shared request refused without naming a task: the caller
# sends the task again alone, in a slot of its own (never within this one).
UNATTRIBUTED = "batchUnattributed"


@dataclass(frozen=True)
class TaskOutcome:
    """What Runware returned for one taskUUID: its data items (one per version or image)."""

    task_uuid: str
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cost(self) -> float:
        """The sum of the items' `cost` (USD); Runware reports it per item."""
        total = 0.0
        for item in self.items:
            value = item.get("cost")
            if isinstance(value, int | float) and not isinstance(value, bool):
                total += float(value)
        return total


@dataclass(frozen=True)
class _Answer:
    """What one HTTP request got back, shared by every task it carried."""

    status: int = 0
    body: Any = None  # the parsed JSON, or None when it was not JSON
    retry_after: float | None = None
    failure: tuple[str, str] | None = None  # (code, what happened) when there was no answer
    size: int = 1  # tasks the request carried
    _strike: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def claim_strike(self) -> bool:
        """True for the first task that asks: a throttled request counts one strike against
        the fleet's cool-down, however many tasks it carried."""
        return self._strike.acquire(blocking=False)

    def unattributed_rejection(self) -> bool:
        """A 4xx for a request of several tasks whose errors name none of them: whose fault it
        was cannot be told. (401, 402 and 403 are about the account, so every task's.)"""
        if self.size < 2 or not 400 <= self.status < 500:
            return False
        if self.status in (401, 402, 403, 408, 429):
            return False
        errors = _errors_of(self.body)
        return not any(error.get("taskUUID") for error in errors)


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), if there is a usable one."""
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        from datetime import UTC, datetime

        return max(0.0, (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _errors_of(body: Any) -> list[dict[str, Any]]:
    """Both documented error shapes: {"errors": [...]} and the older {"error": {...}}."""
    if not isinstance(body, dict):
        return []
    found: list[dict[str, Any]] = []
    errors = body.get("errors")
    if isinstance(errors, list):
        found.extend(e for e in errors if isinstance(e, dict))
    single = body.get("error")
    if isinstance(single, dict):
        found.append(single)
    elif isinstance(single, str):
        found.append({"message": single})
    return found


class RunwareClient:
    """A Runware REST client for one process. Thread-safe: the pool is sized to the concurrency."""

    def __init__(self, settings: Settings, pool_size: int = 10) -> None:
        self._url = settings.runware_api_url
        self._where = redact(self._url)  # the URL as messages may show it
        self._timeout = (settings.runware_connect_timeout_s, settings.runware_timeout_s)
        key = settings.runware_api_key
        self._key = key.get_secret_value() if key is not None else None
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Content-Type": "application/json", "User-Agent": USER_AGENT})
        # Every request is the same but for its body: prepared once, with what requests would
        # otherwise look up in the environment on every call (proxies, the CA bundle, netrc).
        # That merging and preparing was a third of a request's CPU in the worker's profile.
        # (A URL requests cannot use, such as "http://" alone, fails each call as before: with
        # the URL masked, never with the request's headers.)
        self._request: requests.PreparedRequest | None = None
        self._send_options: dict[str, Any] = {}
        with contextlib.suppress(requests.RequestException, ValueError):
            auth = {"Authorization": f"Bearer {self._key}"}
            self._request = self.session.prepare_request(
                requests.Request("POST", self._url, headers=auth)
            )
            self._send_options = dict(
                self.session.merge_environment_settings(self._url, {}, None, None, None)
            )
        self._batcher: Coalescer[_Answer] = Coalescer(
            self._send,
            settings.runware_batch_max,
            settings.runware_batch_window_ms / 1000,
            lambda: TransientError(
                "the shared Runware request this task joined was never sent (the job that "
                "would send it was interrupted); nothing was called, it goes again",
                code=UNATTRIBUTED,
            ),
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def on_the_way(self, token: str | None = None) -> AbstractContextManager[None]:
        """Around a job's run: this thread's call is on its way (see tasks/batching.py)."""
        return self._batcher.on_the_way(token)

    def expect(self, token: str) -> None:
        """A job was received and will start in a moment (see tasks/batching.py)."""
        self._batcher.expect(token)

    def redact(self, text: str) -> str:
        """`text` with this client's API key and URL query strings (webhook tokens), should
        any server echo them, masked."""
        return mask(mask_urls(text), self._key)

    # --- calls ---------------------------------------------------------------------------------
    def run(self, task: dict[str, Any], alone: bool = False) -> TaskOutcome:
        """Send one task object and return its items (sync delivery) or its acknowledgement,
        in one request (shared with other tasks of this process unless `alone`)."""
        return self._post(task, str(task["taskUUID"]), alone)

    def get_response(self, task_uuid: str, alone: bool = False) -> tuple[bool, TaskOutcome]:
        """Poll an async task: (finished, outcome). Raises on a task that ended in error."""
        poll = {"taskType": "getResponse", "taskUUID": task_uuid}
        return self.settle(task_uuid, self._post(poll, task_uuid, alone).items)

    def settle(self, task_uuid: str, items: list[dict[str, Any]]) -> tuple[bool, TaskOutcome]:
        """An async task's items, from a poll or its webhooks: (finished, outcome). Raises on a
        task that ended in error."""
        finished: list[dict[str, Any]] = []
        for item in items:
            status = str(item.get("status", "success")).lower()
            if status in PENDING_STATUSES:
                return False, TaskOutcome(task_uuid)
            if status == "error":
                error = item.get("error") if isinstance(item.get("error"), dict) else item
                raise self._per_task_error([error] if isinstance(error, dict) else [], task_uuid)
            finished.append(item)
        return bool(finished), TaskOutcome(task_uuid, finished)

    # --- wire ----------------------------------------------------------------------------------
    def _post(self, task: dict[str, Any], task_uuid: str, alone: bool) -> TaskOutcome:
        if self._key is None:
            raise AuthenticationError(
                "RUNWARE_API_KEY is not set: set it to your Runware API key", code="missingApiKey"
            )
        kind = str(task.get("taskType", "?"))
        started = time.monotonic()
        metrics.RUNWARE_IN_FLIGHT.inc()
        try:
            if kind in BATCHED_TASK_TYPES:
                answer = self._batcher.call(kind, task, alone)
            else:  # (an image or video: no promptEnhance request waits for it)
                self._batcher.arrived()
                answer = self._send([task])
        finally:
            metrics.RUNWARE_IN_FLIGHT.dec()
            metrics.RUNWARE_LATENCY.labels(kind).observe(time.monotonic() - started)
        if answer.failure is not None:
            code, what = answer.failure
            metrics.RUNWARE_CALLS.labels(kind, code).inc()
            raise TransientError(f"Runware {kind} {task_uuid}: {what}", code=code)
        outcome = "ok" if answer.status == 200 else f"http_{answer.status}"
        metrics.RUNWARE_CALLS.labels(kind, outcome).inc()
        tracing.on_call(
            {"http.response.status_code": answer.status, "runware.request.tasks": answer.size}
        )
        if answer.unattributed_rejection():
            _code, text = self._describe(_errors_of(answer.body))
            raise TransientError(
                f"Runware {kind} {task_uuid}: HTTP {answer.status} for a request of "
                f"{answer.size} tasks that names none of them ({text}); it goes again alone",
                code=UNATTRIBUTED,
                status=answer.status,
            )
        return self._parse(answer, kind, task_uuid)

    def _send(self, tasks: list[dict[str, Any]]) -> _Answer:
        """One HTTP request carrying `tasks`; its answer, or the transport failure."""
        metrics.RUNWARE_BATCH_SIZE.observe(len(tasks))
        try:
            if self._request is None:
                raise requests.exceptions.InvalidURL()
            request = self._request.copy()
            request.prepare_body(json.dumps(tasks).encode(), None)
            if self.session.cookies:  # ones Runware's front set: sent back, as requests would
                request.prepare_cookies(self.session.cookies)
            response = self.session.send(request, timeout=self._timeout, **self._send_options)
        except requests.Timeout as exc:
            return _Answer(
                failure=(
                    "timeout",
                    f"no answer from {self._where} within the timeout ({type(exc).__name__})",
                )
            )
        except requests.RequestException as exc:
            return _Answer(
                failure=(
                    "connection",
                    f"connection to {self._where} failed ({type(exc).__name__}); is "
                    "RUNWARE_API_URL right?",
                )
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        retry_after = (
            _retry_after(response)
            if response.status_code in (408, 429) or response.status_code >= 500
            else None
        )
        return _Answer(
            status=response.status_code, body=body, retry_after=retry_after, size=len(tasks)
        )

    def _parse(self, answer: _Answer, kind: str, task_uuid: str) -> TaskOutcome:
        status, body = answer.status, answer.body
        errors = _errors_of(body)
        data = body.get("data") if isinstance(body, dict) else body
        items = [
            item
            for item in (data if isinstance(data, list) else [])
            if isinstance(item, dict) and item.get("taskUUID", task_uuid) == task_uuid
        ]
        own_errors = [e for e in errors if e.get("taskUUID", task_uuid) == task_uuid]
        if status != 200:
            if items and not own_errors:  # an error of another task in the same request
                return TaskOutcome(task_uuid, items)
            if errors and not own_errors:
                raise TransientError(
                    f"Runware {kind} {task_uuid}: HTTP {status} for another task of the same "
                    "request; this one was not run",
                    code="batchRejected",
                    status=status,
                )
            raise self._status_error(answer, errors, kind, task_uuid)
        if body is None:
            raise TransientError(
                f"Runware {kind} {task_uuid}: answered 200 with a body that is not JSON",
                code="badResponse",
                status=status,
            )
        if own_errors and not items:
            raise self._per_task_error(own_errors, task_uuid)
        if not isinstance(data, list) or (not items and kind != "getResponse"):
            # (An empty answer to a poll means "not yet"; to anything else it is no answer.)
            raise TransientError(
                f"Runware {kind} {task_uuid}: answered 200 without data for this task",
                code="badResponse",
                status=status,
            )
        return TaskOutcome(task_uuid, items)

    def _describe(self, errors: list[dict[str, Any]]) -> tuple[str | None, str]:
        if not errors:
            return None, "no error details"
        first = errors[0]
        code = first.get("code")
        message = str(first.get("message") or "no message")
        parameter = first.get("parameter")
        text = f"{code}: {message}" if code else message
        if parameter:
            text += f" (parameter {parameter})"
        return (str(code) if code else None), self.redact(text)

    def _per_task_error(self, errors: list[dict[str, Any]], task_uuid: str) -> Exception:
        code, text = self._describe(errors)
        return runware_error(f"Runware rejected task {task_uuid}: {text}", 200, code)

    def _status_error(
        self,
        answer: _Answer,
        errors: list[dict[str, Any]],
        kind: str,
        task_uuid: str,
    ) -> Exception:
        code, text = self._describe(errors)
        message = f"Runware {kind} {task_uuid}: HTTP {answer.status}, {text}"
        error = runware_error(message, answer.status, code, answer.retry_after)
        if isinstance(error, RateLimited):
            # One strike per request; the request's other tasks just give their slots back.
            error.strike = answer.claim_strike()
        return error


# --- one client per process, created lazily after fork -----------------------------------------
_lock = threading.Lock()
_client: tuple[int, RunwareClient] | None = None
_pool_size = 10


def configure_pool(size: int) -> None:
    """Size the connection pool of clients made from now on (the worker's concurrency)."""
    global _pool_size
    _pool_size = max(1, size)


def reset_client() -> None:
    """Drop this process's client (after a fork, or when settings change)."""
    global _client
    with _lock:
        if _client is not None and _client[0] == os.getpid():
            _client[1].close()
        _client = None


def get_client() -> RunwareClient:
    """This process's RunwareClient; a forked child never reuses its parent's sockets."""
    global _client
    pid = os.getpid()
    current = _client
    if current is not None and current[0] == pid:
        return current[1]
    with _lock:
        if _client is None or _client[0] != pid:
            _client = (pid, RunwareClient(get_settings(), _pool_size))
            logger.debug("Created the Runware HTTP session for process %s.", pid)
        return _client[1]
