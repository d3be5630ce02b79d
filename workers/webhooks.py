"""`enhance-worker webhooks`: the receiver of Runware's webhooks (Starlette under uvicorn).

POST /runware/webhook?job=..&n=..&token=..  one result item of an async call (tasks/webhooks.py
    makes the URL). The body is Runware's complete response, `{"data": [item]}` (a bare item,
    a list of items and `{"errors": [...]}` are accepted too). Answers:
    - 200 once the items are stored where the waiting job finds them and the job is woken
      (a repeated POST stores nothing new and gets 200 too);
    - 401 without a token, 403 with a wrong one (nothing changes);
    - 400 for a body that is not JSON or carries no item of one taskUUID; 413 for a body
      larger than RUNWARE_WEBHOOK_MAX_BODY_BYTES;
    - 503 while Redis cannot be reached (Runware retries until it gets a 2xx).
GET /healthz   200 when the state Redis answers.
GET /metrics   enhance_webhooks_received_total{outcome}, for Prometheus.

Tokens are secrets: the access log is off, and the receiver's own log lines mask query strings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from config.settings import Settings, get_settings
from tasks.webhooks import PATH, Inbox, get_inbox, token_is_valid

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
RECEIVED = Counter(
    "enhance_webhooks_received",
    "Webhook POSTs from Runware, by outcome (stored, duplicate, unauthorized, forbidden, "
    "bad_request, too_large, unavailable).",
    ["outcome"],
    registry=REGISTRY,
)
OUTCOMES = (
    "stored",
    "duplicate",
    "unauthorized",
    "forbidden",
    "bad_request",
    "too_large",
    "unavailable",
)
for _outcome in OUTCOMES:  # every series exists from the start (rate() needs a zero)
    RECEIVED.labels(_outcome)


class _TooLarge(Exception):
    pass


def items_of(body: Any) -> list[dict[str, Any]]:
    """The result items in a webhook body (Runware's errors become error items)."""
    if isinstance(body, list):
        return [item for item in body if isinstance(item, dict)]
    if not isinstance(body, dict):
        return []
    found: list[dict[str, Any]] = []
    if isinstance(body.get("data"), list):
        found += [item for item in body["data"] if isinstance(item, dict)]
    if isinstance(body.get("errors"), list):
        found += [
            {"taskUUID": error.get("taskUUID"), "status": "error", "error": error}
            for error in body["errors"]
            if isinstance(error, dict)
        ]
    if not found and "taskUUID" in body and "data" not in body:
        found = [body]  # a bare item
    return found


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(outcome: str, status: int, detail: str) -> JSONResponse:
    RECEIVED.labels(outcome).inc()
    return JSONResponse({"outcome": outcome, "detail": detail}, status_code=status)


def create_app(settings: Settings | None = None, inbox: Inbox | None = None) -> Starlette:
    """The receiver's ASGI app."""
    settings = settings or get_settings()

    def the_inbox() -> Inbox:
        return inbox if inbox is not None else get_inbox()

    async def webhook(request: Request) -> Response:
        params = request.query_params
        given, job_id = params.get("token", ""), params.get("job", "")
        if not given or not job_id:
            return _answer("unauthorized", 401, "the URL carries no token")
        try:
            expected = int(params.get("n", "1"))
        except ValueError:
            return _answer("forbidden", 403, "the URL's item count is not a number")
        try:
            raw = await _body(request, settings.runware_webhook_max_body_bytes)
        except _TooLarge:
            limit = settings.runware_webhook_max_body_bytes
            return _answer("too_large", 413, f"body: larger than {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _answer("bad_request", 400, "body: not JSON")
        items = items_of(body)
        uuids = {item.get("taskUUID") for item in items}
        if len(uuids) != 1 or None in uuids:  # (no item at all is no taskUUID either)
            return _answer("bad_request", 400, "body: no result items of one taskUUID")
        task_uuid = str(uuids.pop())
        if not token_is_valid(settings, given, task_uuid, job_id, expected):
            return _answer("forbidden", 403, "the token does not match this call")

        def keep() -> tuple[int, bool]:
            store = the_inbox()
            new, complete = store.store(task_uuid, items, expected)
            if complete:
                store.wake(job_id)
            return new, complete

        try:  # (redis-py blocks: off the event loop)
            new, complete = await run_in_threadpool(keep)
        except redis.RedisError as exc:
            logger.warning("Webhook for taskUUID %s not stored: %s", task_uuid, exc)
            return _answer("unavailable", 503, "the inbox cannot be reached; retry")
        if new == 0:
            return _answer("duplicate", 200, "already stored")
        logger.info(
            "Webhook for taskUUID %s: %d new item(s)%s.",
            task_uuid,
            new,
            ", the job is woken" if complete else "",
        )
        return _answer("stored", 200, "stored")

    async def healthz(_request: Request) -> Response:
        try:
            await run_in_threadpool(the_inbox().state.ping)
        except redis.RedisError:
            return PlainTextResponse("state Redis unreachable\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route(PATH, webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


def serve(host: str, port: int) -> int:
    """Run the receiver until stopped (SIGINT/SIGTERM)."""
    import uvicorn

    settings = get_settings()
    if settings.runware_webhook_url is None:
        logger.warning(
            "RUNWARE_WEBHOOK_URL is not set: the workers give Runware no webhook URL, so "
            "nothing will reach this receiver (set it to this receiver's public base URL)."
        )
    logger.info("Webhook receiver listening on http://%s:%d%s", host, port, PATH)
    # No access log: each line would carry the URL's token.
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_config=None)
    return 0
