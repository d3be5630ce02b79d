"""What the dispatcher needs to know of a Celery message, read in the dispatcher's process.

The fleet's dispatcher (tasks/dispatcher.py) looks at the messages waiting in the Celery queues
before its step, decides here what each one is, and hands the step (tasks/lua/pump.lua) the
answers with a fingerprint of each message: the script then moves the messages without
decoding any of them. Decoding in Lua cost Redis about 0.2 ms per message of a 300-character
prompt and 1 ms at 3,000 characters (base64 and JSON in Lua), a step of 100 messages then held
every client of the broker for 20-100 ms; here, C's base64 and JSON take microseconds, in a
process of the fleet's own, and Redis does list operations only.

A message is one of:
- CALL: a task that calls Runware (it waits for a grant), with its account and priority class;
- PASS: a task the workers know that needs no grant, or a call whose `account` or `priority`
  the task refuses (it fails at once, naming the field, without calling Runware);
- OTHER: a task the workers do not know (Celery reports it);
- BAD: a message no worker could read (not JSON, an envelope without its properties, delivery
  tag or body, a content type other than JSON, a compression kombu does not know). It never
  reaches a worker (kombu raises on some of these outside any recoverable error, and the worker
  exits): the dispatcher files it in the dead letters with the reason (`enhance-worker failed
  list`).
"""

from __future__ import annotations

import base64
import binascii
import bz2
import hashlib
import json
import lzma
import zlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from enhance_client.schemas import PRIORITIES, check_account

# The largest body decoded (after decompression) to read a call's account and priority. A
# call's own arguments are far smaller (prompts <= 3,000 characters, URLs <= 2,048, five
# versions of a chained result); a larger body (a long chain or chord embedded in it) is not
# decoded, and its call waits for a grant as the default account's, interactive.
MAX_DECODE_BYTES = 256 * 1024
FINGERPRINT_SPAN = 512  # bytes from each end of a message that its fingerprint covers

CALL, PASS, OTHER, BAD = "c", "p", "o", "x"
ACCEPTED_CONTENT = "application/json"  # the workers accept JSON only (config/celery.py)
COMPRESSIONS = frozenset(
    {"application/x-gzip", "gzip", "zlib", "application/x-bz2", "bzip2", "bzip"}
    | {"application/x-lzma", "lzma", "xz"}
)
CLASSES = {name: name[0] for name in PRIORITIES}  # interactive -> i, batch -> b
CONTINUES_HEADER = "enhance_continues"  # set by tasks/base.py on a poll or retry it sends


@dataclass(frozen=True)
class Read:
    """A message as the dispatcher's step needs it."""

    kind: str  # CALL, PASS, OTHER or BAD
    account: str = ""  # CALL only
    klass: str = ""  # CALL only: "i" or "b"
    task_id: str = ""
    tag: str = ""  # kombu's delivery tag ("" if none)
    due: float | None = None  # epoch seconds of its ETA or countdown, if any
    continues: bool = False  # a poll or step of a call under way: ahead of its account's queue
    reason: str = ""  # BAD only: why no worker could read it
    task: str = ""  # the task's name, when the message names one
    # For the task-sent event the fleet sends when it takes the job in (Flower): the producer's
    # argument reprs (protocol 2 headers) and the retry count.
    argsrepr: str = ""
    kwargsrepr: str = ""
    retries: int = 0
    traceparent: str = ""  # the producer's trace (W3C), for the span of the wait (tasks/tracing.py)

    def code(self) -> str:
        """The kind, the class and `continues` in one word (pump.lua reads it by position)."""
        return f"{self.kind}{self.klass or '-'}{'1' if self.continues else '0'}"


def fingerprint(raw: bytes) -> str:
    """The message's length and a digest of both its ends (kombu puts the unique delivery tag
    and task id in the last few hundred bytes); pump.lua computes the same with
    redis.sha1hex to check that the message it pops is the one read here."""
    span = FINGERPRINT_SPAN
    ends = raw[:span] + (raw[-span:] if len(raw) > span else b"")
    return f"{len(raw)}:{hashlib.sha1(ends, usedforsecurity=False).hexdigest()}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _epoch(eta: Any) -> float | None:
    """Seconds since the epoch of Celery's ISO 8601 `eta` (UTC if it names no zone)."""
    if not isinstance(eta, str):
        return None
    try:
        moment = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _decompress(data: bytes, method: str) -> bytes | None:
    """`data` decompressed by kombu's `compression` header, at most MAX_DECODE_BYTES of it."""
    limit = MAX_DECODE_BYTES + 1
    decompressor: Any
    if method in ("application/x-gzip", "gzip", "zlib"):
        decompressor = zlib.decompressobj()
        out = decompressor.decompress(data, limit)
    elif method in ("application/x-bz2", "bzip2", "bzip"):
        out = bz2.BZ2Decompressor().decompress(data, limit)
    elif method in ("application/x-lzma", "lzma", "xz"):
        out = lzma.LZMADecompressor().decompress(data, limit)
    else:
        return None
    return out if len(out) <= MAX_DECODE_BYTES else None


def _body(env: dict[str, Any], headers: dict[str, Any]) -> Any:
    """The decoded body (the task's arguments) if it is JSON and small enough, else None."""
    text = env.get("body")
    if env.get("content-type") != "application/json" or not isinstance(text, str):
        return None
    if len(text) > MAX_DECODE_BYTES * 2:  # base64 of a compressed body may still be larger
        return None
    props = env.get("properties")
    data: bytes = text.encode()
    if isinstance(props, dict) and props.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            return None
    method = headers.get("compression")
    if method is not None:
        decompressed = _decompress(data, str(method))
        if decompressed is None:
            return None
        data = decompressed
    if len(data) > MAX_DECODE_BYTES:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _unreadable(env: dict[str, Any]) -> str:
    """Why no worker could take this envelope ("" if one can)."""
    props = env.get("properties")
    if not isinstance(props, dict):
        return "no `properties` object in the envelope"
    if not isinstance(props.get("delivery_tag"), str):
        return "no `delivery_tag` in the envelope's properties"
    if not isinstance(props.get("delivery_info"), dict):
        return "no `delivery_info` in the envelope's properties"
    if not isinstance(env.get("body"), str):
        return "no `body` string in the envelope"
    if "headers" in env and not isinstance(env["headers"], dict):
        return "`headers` is not an object"
    content = env.get("content-type")
    if content != ACCEPTED_CONTENT:
        return f"content type {content!r}: the workers accept {ACCEPTED_CONTENT} only"
    headers = env.get("headers") or {}
    method = headers.get("compression")
    if method is not None and (not isinstance(method, str) or method not in COMPRESSIONS):
        return f"compression {method!r}: not one kombu can decompress"
    return ""


def read(raw: bytes, runware_tasks: frozenset[str], known_tasks: frozenset[str]) -> Read:
    """What `raw` (a message as kombu stores it in Redis) is, for the dispatcher. Never raises:
    a message that makes the reading fail is BAD (the dispatcher must never stall on one)."""
    try:
        found = _read(raw, runware_tasks, known_tasks)
    except Exception as exc:  # nested past the recursion limit, a corrupt compressed body...
        return Read(BAD, reason=f"unreadable ({type(exc).__name__})")
    for text in (found.task_id, found.tag):
        try:
            text.encode()  # the step's arguments are UTF-8
        except UnicodeEncodeError:
            return Read(BAD, reason="a task id or delivery tag that is not valid UTF-8")
    return found


def _read(raw: bytes, runware_tasks: frozenset[str], known_tasks: frozenset[str]) -> Read:
    try:
        env = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return Read(BAD, reason="not JSON: not a message kombu wrote")
    if not isinstance(env, dict):
        return Read(BAD, reason="not a JSON object: not a message kombu wrote")
    headers: dict[str, Any] = env["headers"] if isinstance(env.get("headers"), dict) else {}
    bad = _unreadable(env)
    if bad:
        return Read(BAD, reason=bad, task=_text(headers.get("task")) or "")
    props: dict[str, Any] = env["properties"]
    tag = _text(props.get("delivery_tag")) or ""
    task, task_id, eta = headers.get("task"), headers.get("id"), headers.get("eta")
    continues = headers.get(CONTINUES_HEADER) == "1"
    kwargs: Any = None
    if task is None:  # protocol 1: the body is the request, task name included
        decoded = _body(env, headers)
        if isinstance(decoded, dict):
            task, task_id, eta = decoded.get("task"), decoded.get("id"), decoded.get("eta")
            kwargs = decoded.get("kwargs")
    task_id = _text(task_id) or ""
    due = _epoch(eta)
    if not isinstance(task, str) or task not in known_tasks:
        return Read(OTHER, task_id=task_id, tag=tag, due=due, continues=continues)
    retries = headers.get("retries")
    passes = Read(
        PASS,
        task_id=task_id,
        tag=tag,
        due=due,
        continues=continues,
        task=task,
        argsrepr=_text(headers.get("argsrepr")) or "",
        kwargsrepr=_text(headers.get("kwargsrepr")) or "",
        retries=retries if type(retries) is int else 0,
        traceparent=_text(headers.get("traceparent")) or "",
    )
    if task not in runware_tasks or not task_id:
        return passes
    if kwargs is None and headers.get("task") is not None:
        decoded = _body(env, headers)
        if isinstance(decoded, list | tuple) and len(decoded) >= 2:  # [args, kwargs, embed]
            kwargs = decoded[1]
        elif decoded is None:
            kwargs = {}  # too large or unreadable here: the default account's, interactive
    if not isinstance(kwargs, dict):
        kwargs = {}
    account, priority = kwargs.get("account", "default"), kwargs.get("priority", "interactive")
    try:
        account = check_account(account)
    except ValueError:
        return passes
    klass = CLASSES.get(priority) if isinstance(priority, str) else None
    if klass is None:
        return passes
    return replace(passes, kind=CALL, account=account, klass=klass)
