"""A real HTTP server that speaks Runware's REST protocol, for the demo, the tests and benchmarks.

It checks requests as Runware does (Bearer key, JSON array body, the fields and limits of
promptEnhance, imageInference and videoInference (workers/sandbox/protocol.py), unique
taskUUIDs), answers one item per version or image with the same taskUUID and `cost` when asked,
supports async delivery with getResponse, and can inject latency, 429, 500, 503, hangs and garbled
bodies at a rate, and any of FAULTS (400, 401, 402, 403, 404, "empty", ...) for the next
requests. It is never used silently: it announces itself when it starts.

Control endpoints (not part of Runware): GET /_sandbox/health, GET /_sandbox/stats,
POST /_sandbox/config (JSON fields of SandboxConfig), POST /_sandbox/reset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from workers.sandbox.protocol import MICRO, accept, check, error, valid_uuid4

logger = logging.getLogger(__name__)

# Names for `fail_next`; "none" answers normally (to place a fault later in a sequence).
FAULTS = (
    "400",  # names the request's first task, as Runware's validation errors name theirs
    "400-unnamed",  # a 400 whose error names no task
    "401",
    "402",
    "403",
    "404",
    "408",
    "429",
    "500",
    "503",
    "hang",
    "garbage",
    "drop",  # the connection is closed without an answer (nothing was run)
    "empty",  # accepted and billed, but the items carry no text, image or video
    "none",
)
FAULT_CODES = {
    "400": "invalidParameter",
    "400-unnamed": "invalidRequest",
    "401": "invalidApiKey",
    "402": "insufficientCredits",
    "403": "forbidden",
    "404": "notFound",
    "408": "requestTimeout",
    "429": "queueCapacityExceeded",
    "500": "serverError",
    "503": "serviceUnavailable",
}


_BARE = ("taskType", "taskUUID", "cost")  # what an "empty" answer keeps of an item


@dataclass
class SandboxConfig:
    """What the sandbox does; every field can be changed at run time via /_sandbox/config."""

    api_key: str | None = None  # None: any non-empty key is accepted
    latency_s: float = 0.0
    cost_per_item: float = 0.0013  # USD per enhanced version
    image_cost: float = 0.0019  # USD per 1024x1024 image (scaled by its area)
    video_cost: float = 0.25  # USD per video
    async_delay_s: float = 2.0  # how long an async enhancement or image takes
    video_render_s: float = 5.0  # how long a video takes to render
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    rate_garbage: float = 0.0
    hang_s: float = 5.0
    retry_after_s: float | None = None  # sent with 429/500/503 when set
    fail_next: list[str] = field(default_factory=list)  # faults for the next requests, in order
    echo_key: bool = False  # an injected fault's message quotes the API key it was sent
    webhook_copies: int = 1  # POSTs of each webhook item (2: each comes twice, as retries do)
    webhook_retry_s: float = 0.5  # first wait before a webhook POST is retried (doubling, 8 s cap)
    webhook_give_up_s: float = 120.0  # a webhook not answered 2xx within this is dropped
    seed: int | None = None
    reword_versions: bool = False  # each version reorders the prompt's words


@dataclass
class _Stored:
    task_type: str
    items: list[dict[str, Any]]
    ready_at: float


class SandboxState:
    """Everything the sandbox has seen and billed; thread-safe."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.random = random.Random(config.seed)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            # Requests still open from before a reset must not count against the new numbers.
            self.generation = getattr(self, "generation", 0) + 1
            self.tasks: dict[str, _Stored] = {}
            self.requests = 0
            self.tasks_received = 0  # task objects in all API requests, refused ones too
            self.by_type: dict[str, int] = {}
            self.statuses: dict[str, int] = {}
            self.accepted: dict[str, int] = {}  # taskUUID -> times accepted (billed)
            self.billed_micro = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.webhooks: list[tuple[float, str, int]] = []  # (at, taskUUID, status; 0: none)
            self.done_at: dict[str, float] = {}  # taskUUID -> when it was done (epoch s)
            self.call_times: list[float] = []  # arrival of every API request
            self.throttled_at: list[float] = []  # when each 429/503 answer was sent
            self.auth_failures = 0
            self.bodies: dict[str, dict[str, Any]] = {}  # taskUUID -> the last task object sent
            self.accepted_log: list[tuple[float, str]] = []  # (time, prompt) per accepted task
            # (time, injected fault or "", taskUUIDs) per API request, to explain a failed test
            self.request_log: list[tuple[float, str, list[str]]] = []

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "tasks_received": self.tasks_received,
                "by_type": dict(self.by_type),
                "statuses": dict(self.statuses),
                "accepted": dict(self.accepted),
                "billed_usd": self.billed_micro / MICRO,
                "billed_micro": self.billed_micro,
                "max_in_flight": self.max_in_flight,
                "in_flight": self.in_flight,
                "call_times": list(self.call_times),
                "throttled_at": list(self.throttled_at),
                "auth_failures": self.auth_failures,
                "webhooks": list(self.webhooks),
                "done_at": dict(self.done_at),
                "accepted_log": list(self.accepted_log),
            }

    def next_fault(self) -> str | None:
        with self.lock:
            cfg = self.config
            if cfg.fail_next:
                return cfg.fail_next.pop(0)
            roll = self.random.random()
            for name, rate in (
                ("429", cfg.rate_429),
                ("500", cfg.rate_500),
                ("503", cfg.rate_503),
                ("hang", cfg.rate_hang),
                ("garbage", cfg.rate_garbage),
            ):
                if roll < rate:
                    return name
                roll -= rate
            return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SandboxServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle's algorithm and the
        # client's delayed ACK add about 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox: %s", format % args)

    # --- plumbing ------------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        payload = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        with self.server.state.lock:
            key = str(status)
            self.server.state.statuses[key] = self.server.state.statuses.get(key, 0) + 1

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"null")

    def do_GET(self) -> None:
        if self.path.startswith("/_sandbox/stats"):
            self._send(200, self.server.state.stats())
        elif self.path.startswith("/_sandbox/health"):
            self._send(200, {"ok": True, "sandbox": True})
        else:
            self._send(404, {"errors": [error("notFound", "POST task arrays to /v1")]})

    def do_POST(self) -> None:
        state = self.server.state
        if self.path.startswith("/_sandbox/"):
            self._control(state)
            return
        with state.lock:
            generation = state.generation
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._api(state)
        finally:
            with state.lock:
                if state.generation == generation:
                    state.in_flight -= 1

    def _control(self, state: SandboxState) -> None:
        if self.path.startswith("/_sandbox/reset"):
            self._read_json()
            state.reset()
            self._send(200, {"ok": True})
        elif self.path.startswith("/_sandbox/config"):
            changes = self._read_json() or {}
            with state.lock:
                for name, value in changes.items():
                    if not hasattr(state.config, name):
                        self._send(400, {"error": f"unknown sandbox setting {name}"})
                        return
                    setattr(state.config, name, value)
                current = asdict(state.config)
            current.pop("api_key", None)
            self._send(200, current)
        else:
            self._send(404, {"error": "unknown control endpoint"})

    # --- the Runware API -----------------------------------------------------------------------
    def _api(self, state: SandboxState) -> None:
        with state.lock:
            state.requests += 1
            state.call_times.append(time.time())
            expected = state.config.api_key
            latency = state.config.latency_s
        try:
            body = self._read_json()
        except (ValueError, UnicodeDecodeError):
            self._send(400, {"errors": [error("invalidJSON", "the body is not valid JSON")]})
            return
        if isinstance(body, list):
            with state.lock:
                state.tasks_received += len(body)
        auth = self.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not key:
            with state.lock:
                state.auth_failures += 1
            self._send(401, {"errors": [error("missingApiKey", "no API key was sent")]})
            return
        if expected is not None and key != expected:
            with state.lock:
                state.auth_failures += 1
            self._send(401, {"errors": [error("invalidApiKey", "the API key is not valid")]})
            return
        if not isinstance(body, list) or not body or not all(isinstance(t, dict) for t in body):
            self._send(
                400,
                {
                    "errors": [
                        error("invalidRequest", "the body must be a JSON array of task objects")
                    ]
                },
            )
            return
        fault = state.next_fault()
        with state.lock:
            uuids = [str(task.get("taskUUID")) for task in body]
            state.request_log.append((time.time(), fault or "", uuids))
        if fault in FAULT_CODES or fault in ("garbage", "drop"):
            if latency > 0:
                time.sleep(latency)
            self._fault(state, fault, key, body[0])
            return
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        # Runware accepts (and bills) a task when it arrives, so a resend of its taskUUID while it
        # still works gets 409 and getResponse says "processing"; polls read after the latency.
        polls = [t for t in body if t.get("taskType") == "getResponse"]
        for task in body:
            if task.get("taskType") != "getResponse":
                self._one(state, task, data, errors, latency)
        if latency > 0:
            time.sleep(latency)
        for task in polls:
            self._one(state, task, data, errors, latency)
        if fault == "hang":
            time.sleep(state.config.hang_s)  # processed and billed, but the answer comes too late
        if fault == "empty":
            data = [{k: v for k, v in item.items() if k in _BARE} for item in data]
        status = 200 if data or not errors else self._status_for(errors)
        answer: dict[str, Any] = {"data": data}
        if errors:
            answer["errors"] = errors
        self._send(status, answer)

    def _fault(self, state: SandboxState, fault: str, key: str, first: dict[str, Any]) -> None:
        if fault == "drop":  # no status line, no body: the client sees the connection drop
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "garbage":
            self._send(200, None, raw=b"<html>502 bad gateway</html>")
            return
        headers = {}
        if fault in ("429", "500", "503") and state.config.retry_after_s is not None:
            headers["Retry-After"] = f"{state.config.retry_after_s:g}"
        if fault in ("429", "503"):
            with state.lock:
                state.throttled_at.append(time.time())
        message = "injected by the sandbox"
        if state.config.echo_key:  # as careless gateways do: the caller's key quoted back
            message += f" (request made with the API key {key!r})"
        injected = error(FAULT_CODES[fault], message, first if fault == "400" else None)
        self._send(int(fault[:3]), {"errors": [injected]}, headers)

    @staticmethod
    def _status_for(errors: list[dict[str, Any]]) -> int:
        return 409 if errors[0].get("code") == "conflictTaskUUID" else 400

    def _one(
        self,
        state: SandboxState,
        task: dict[str, Any],
        data: list[dict[str, Any]],
        errors: list[dict[str, Any]],
        latency: float = 0.0,
    ) -> None:
        kind = str(task.get("taskType"))
        task_uuid = str(task.get("taskUUID"))
        with state.lock:
            state.by_type[kind] = state.by_type.get(kind, 0) + 1
        if not valid_uuid4(task_uuid):
            errors.append(error("invalidTaskUUID", "taskUUID must be a UUID v4", task, "taskUUID"))
            return
        if kind == "getResponse":
            self._get_response(state, task_uuid, data, errors)
            return
        with state.lock:
            state.bodies[task_uuid] = dict(task)
        problem = check(task)
        if problem:
            errors.append(problem)
            return
        host, port = self.server.server_address[:2]
        accepted = accept(task, state.config, f"http://{host!s}:{port}")
        with state.lock:
            if task_uuid in state.tasks:
                conflict = error(
                    "conflictTaskUUID", "this taskUUID was already submitted", task, "taskUUID"
                )
                errors.append(conflict)
                return
            ready_at = time.monotonic() + latency + accepted.ready_in_s
            state.tasks[task_uuid] = _Stored(kind, accepted.items, ready_at)
            state.done_at[task_uuid] = time.time() + (ready_at - time.monotonic())
            state.accepted[task_uuid] = state.accepted.get(task_uuid, 0) + 1
            label = task.get("prompt") or task.get("positivePrompt") or ""
            state.accepted_log.append((time.time(), str(label)[:60]))
            state.billed_micro += accepted.billed_micro
        if accepted.is_async:
            data.append({"taskType": kind, "taskUUID": task_uuid})
        else:
            data.extend(accepted.items)
        if task.get("webhookURL"):
            threading.Thread(
                target=_deliver_webhook,
                args=(state, str(task["webhookURL"]), accepted.items, ready_at),
                daemon=True,
            ).start()

    @staticmethod
    def _get_response(
        state: SandboxState,
        task_uuid: str,
        data: list[dict[str, Any]],
        errors: list[dict[str, Any]],
    ) -> None:
        with state.lock:
            stored = state.tasks.get(task_uuid)
        if stored is None:
            poll = {"taskType": "getResponse", "taskUUID": task_uuid}
            errors.append(error("taskNotFound", "no task with this taskUUID", poll, "taskUUID"))
            return
        if time.monotonic() < stored.ready_at:
            data.append(
                {"taskType": stored.task_type, "taskUUID": task_uuid, "status": "processing"}
            )
            return
        data.extend({**item, "status": "success"} for item in stored.items)


def _deliver_webhook(
    state: SandboxState, url: str, items: list[dict[str, Any]], ready_at: float
) -> None:
    """As Runware does: when the task is done, one POST per item of `{"data": [item]}`, retried
    until it gets a 2xx (here: with a doubling wait, for webhook_give_up_s), `webhook_copies`
    times (a retry after a lost answer brings the same item again)."""
    import requests

    time.sleep(max(0.0, ready_at - time.monotonic()))
    config = state.config
    with requests.Session() as session:
        for item in items:
            payload = {"data": [{**item, "status": "success"}]}
            for _copy in range(max(1, config.webhook_copies)):
                wait, deadline = config.webhook_retry_s, time.monotonic() + config.webhook_give_up_s
                while True:
                    try:
                        status = session.post(url, json=payload, timeout=10).status_code
                    except requests.RequestException:
                        status = 0
                    with state.lock:
                        state.webhooks.append((time.time(), str(item.get("taskUUID")), status))
                    if 200 <= status < 300 or time.monotonic() + wait > deadline:
                        break
                    time.sleep(wait)
                    wait = min(wait * 2, 8.0)


class _SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: SandboxState) -> None:
        super().__init__(address, _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected here (hangs are injected on purpose).
        if isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            logger.debug("sandbox: client %s went away before its answer", client_address)
            return
        super().handle_error(request, client_address)


class Sandbox:
    """A running sandbox server. `url` is what RUNWARE_API_URL should be set to."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, config: SandboxConfig | None = None
    ) -> None:
        self.state = SandboxState(config or SandboxConfig())
        self._server = _SandboxServer((host, port), self.state)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Sandbox:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configure(self, **changes: Any) -> None:
        """Change SandboxConfig fields at run time (fail_next takes names from FAULTS)."""
        unknown_faults = set(changes.get("fail_next", ())) - set(FAULTS)
        if unknown_faults:
            raise ValueError(f"unknown sandbox faults {sorted(unknown_faults)}; known: {FAULTS}")
        with self.state.lock:
            for name, value in changes.items():
                if not hasattr(self.state.config, name):
                    raise AttributeError(f"unknown sandbox setting {name}")
                setattr(self.state.config, name, value)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
