"""A plain Celery app as backend code that does not import this project builds it, routed to the
fleet's own queue as the README says (`task_routes`), so that it never lands in `celery`."""

from __future__ import annotations

from typing import Any

from celery import Celery

FLEET_QUEUE = "enhance"  # CELERY_TASK_DEFAULT_QUEUE's default
# The fleet's tasks, and the suite's own RunwareTasks (tests/integration/own_task_app.py): a
# task of one's own that the fleet runs is routed to its queue the same way.
ROUTES = {"tasks.*": {"queue": FLEET_QUEUE}, "tests.*": {"queue": FLEET_QUEUE}}


def backend_app(*args: Any, **kwargs: Any) -> Celery:
    """`Celery(*args, **kwargs)` with the README's `task_routes` for the fleet's tasks."""
    app = Celery(*args, **kwargs)
    app.conf.task_routes = ROUTES
    return app
