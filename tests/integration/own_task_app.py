"""The project's Celery app plus one task of a user's own, written the way the README's
"Writing a task of your own" says: a body that builds a RunwareJob, calls `call_runware` and
returns a dict, with no retry, logging or metrics code in it.

    celery -A tests.integration.own_task_app worker
"""

from __future__ import annotations

from typing import Any

from config.settings import ENHANCE_MODEL
from tasks.base import RunwareJob, RunwareTask
from workers import app

__all__ = ["app", "shout"]


@app.task(bind=True, base=RunwareTask, name="tests.shout", retry_limit=5)
def shout(self: RunwareTask, *, prompt: str) -> dict[str, Any]:
    """Enhance `prompt` and return the text in capitals."""
    task_uuid = self.call_uuid(None)
    outcome = self.call_runware(
        RunwareJob(
            body={
                "taskType": "promptEnhance",
                "taskUUID": task_uuid,
                "model": ENHANCE_MODEL,
                "prompt": prompt,
                "includeCost": True,
            },
            account="default",
            estimate_usd=0.002,
            deliver_async=False,
            timeout_s=30,
        )
    )
    return {"taskUUID": task_uuid, "text": outcome.items[0]["text"].upper(), "cost": outcome.cost}
