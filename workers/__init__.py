"""The worker entry point: `celery -A workers worker` and `celery -A workers flower`.

Exposes `app`, the shared Celery app with every task module registered.
"""

from __future__ import annotations

import sys

from config.settings import ConfigError

try:
    import tasks  # noqa: F401 - registers the tasks on the app
    import workers.signals  # noqa: F401 - connects the worker life-cycle hooks
    from config.celery import app
except ConfigError as exc:  # one line, naming the variable, instead of a traceback
    sys.stderr.write(f"enhance-worker: {exc}\n")
    raise SystemExit(2) from None

__all__ = ["app"]
