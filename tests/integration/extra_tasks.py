"""A task module only some workers of a test fleet load (`celery worker --include`): a job of
its task is parked while no live worker registers it, and goes back once one does."""

from __future__ import annotations

from config.celery import app


@app.task(name="tests.extra.double")
def double(x: int) -> int:
    return 2 * x
