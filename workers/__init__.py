"""The worker entry point: `celery -A workers worker` and `celery -A workers flower`.

`workers.app` is the shared Celery app with every task module registered and the worker
life-cycle hooks connected. It is built on first access, so tools that only need a helper module
(the harness in `workers.sandbox`) do not read the configuration by importing this package.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["app"]


def _load_app() -> Celery:
    from config.settings import ConfigError

    try:
        import tasks  # noqa: F401 - registers the tasks on the app
        import workers.signals  # noqa: F401 - connects the worker life-cycle hooks
        from config.celery import app
        from tasks import tracing
        from workers.shutdown import Worker

        tracing.check()  # the OTEL_* variables, before the worker starts
    except ConfigError as exc:  # one line, naming the variable, instead of a traceback
        sys.stderr.write(f"enhance-worker: {exc}\n")
        raise SystemExit(2) from None
    # `celery worker` runs app.Worker: here, one whose soft shutdown waits only while jobs run.
    app.Worker = app.subclass_with_self(Worker)  # type: ignore[misc]  # a cached_property
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
