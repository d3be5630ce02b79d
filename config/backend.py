"""The result backend: Celery's Redis backend, with each task state written in one round trip.

Celery writes a state in two: it reads the stored result first, so that a redelivered job never
overwrites a SUCCESS, and then writes and publishes. Here one Lua script does the same check and
the write, atomically (so the check cannot race another worker either), which saves a round trip
on every job. Everything else (reading results, groups, chords) is Celery's own.

Results are the largest share of Redis's memory (docs/operating.md, Sizing), so a SUCCESS is
stored compressed (CELERY_RESULT_COMPRESSION, zlib by default) in Celery 5.7's marked form, which
every Celery 5.7+ reader decodes whatever its own setting. Only a SUCCESS over SMALL_RESULT_BYTES
is compressed: the other states are small, and are never compressed, so that the store script
can tell a SUCCESS by its first byte (a NUL) without a second key beside it. A SUCCESS larger than
LARGE_RESULT_BYTES (a batch's: 25-40 MB for 10,000 prompts of 5 versions) is compressed even with
CELERY_RESULT_COMPRESSION=none: its write, its PUBLISH and every read then move a fifth of it, and
no Redis command holds the server for 100 ms and more.

Selected in config/celery.py with Celery's `module:Class+redis://...` backend URL form
(`SentinelResultStore+sentinel://...` behind Redis Sentinel).
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import compress_payload  # type: ignore[attr-defined]  # (5.7)
from celery.backends.redis import SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from enhance_client.backends import QuietRedisBackend

STORE = """
-- KEYS: 1 the task's result key. ARGV: 1 the encoded meta, 2 seconds to keep it (0: for ever).
-- A stored SUCCESS is never replaced. Only a SUCCESS is ever stored compressed (Celery's marked
-- form, which starts with a NUL byte and cannot be read here), so that byte says SUCCESS.
local current = redis.call('GET', KEYS[1])
if current then
  if string.byte(current, 1) == 0 then return 0 end
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


SMALL_RESULT_BYTES = 256  # below it, the marked form's 38-byte header outweighs the gain
LARGE_RESULT_BYTES = 1 << 20
LARGE_RESULT_COMPRESSION = "zlib"


class ResultStore(QuietRedisBackend):
    """A RedisBackend whose state writes are one atomic script (see the module docstring), and
    that subscribes to no result at send time (enhance_client/backends.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store = self.client.register_script(STORE)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        celery_backend: Any = self  # celery-types lacks these attributes of Celery's backends
        meta = celery_backend._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        _, _, value = celery_backend._encode(meta)  # Celery's encode() would compress any state
        if state == states.SUCCESS:
            compression = celery_backend.compression
            if len(value) > LARGE_RESULT_BYTES:
                value = compress_payload(value, compression or LARGE_RESULT_COMPRESSION)
            elif compression and len(value) > SMALL_RESULT_BYTES:
                value = compress_payload(value, compression)
        if isinstance(value, str) and len(value) > celery_backend._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(  # type: ignore[call-arg]  # (celery-types lacks the kwargs)
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = (
            celery_backend.failure_expires if state == states.FAILURE else celery_backend.expires
        )
        key = self.get_key_for_task(task_id)
        self.ensure(self._store_once, (key, value, int(expires or 0)))
        return result

    def _store_once(self, key: bytes | str, value: bytes | str, expires: int) -> None:
        self._store(keys=[key], args=[value, expires])


class SentinelResultStore(ResultStore, SentinelBackend):
    """The same one-trip writes to the current master of a Sentinel group."""
