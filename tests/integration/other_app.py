"""Another team's Celery app on the same Redis, as most existing set-ups are: Celery's default
queue `celery`, its own worker, its own task.

    OTHER_APP_REDIS_URL=redis://... celery -A tests.integration.other_app worker
"""

from __future__ import annotations

import os

from celery import Celery

url = os.environ["OTHER_APP_REDIS_URL"]
app = Celery("otherapp", broker=url, backend=url)


@app.task(name="otherapp.add")
def add(x: int, y: int) -> int:
    return x + y
