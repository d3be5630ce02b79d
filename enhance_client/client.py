"""The producer's side: enqueue, validate and await prompt enhancements from any app.

It needs only the broker URL (and the fleet's queue), and imports nothing of the worker: not
its settings (no environment variable or `.env` is read), not its Celery app, not its
top-level packages (`config`, `tasks`, `workers`), so it lives inside an app that has modules
of those names. Arguments are validated by the same models the workers use
(`enhance_client.schemas`), before anything is enqueued.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult

from enhance_client.backends import quiet_backend_url
from enhance_client.masking import mask_urls
from enhance_client.schemas import enhance_request
from enhance_client.waiting import off_loop, wait, wait_async

DEFAULT_QUEUE = "enhance"  # the fleet's own queue (the workers' CELERY_TASK_DEFAULT_QUEUE)


class EnhanceClient:
    """Sends `tasks.enhance_prompt` jobs to the fleet and reads their results.

    `EnhanceClient("redis://host:6379/0")`; the result backend defaults to the broker's URL
    (the workers' default too). Pass `app=` to send with a Celery app of your own instead (its
    broker and backend must be the fleet's)."""

    def __init__(
        self,
        broker_url: str | None = None,
        backend_url: str | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        app: Celery | None = None,
    ) -> None:
        if app is None:
            if not broker_url:
                raise ValueError("EnhanceClient needs the fleet's broker URL (or app=)")
            app = Celery(
                "enhance_client",
                broker=broker_url,
                backend=quiet_backend_url(backend_url or broker_url),
                set_as_current=False,
            )
            app.conf.update(
                task_serializer="json",
                result_serializer="json",
                accept_content=["json"],
                result_accept_content=["json"],
                # No task-sent event from here: the fleet's dispatcher sends one, with the
                # arguments masked, as it takes the job in (a webhook token stays out of Flower).
                task_send_sent_event=False,
            )
            self._own_app = True
        else:
            self._own_app = False
        self.app = app
        self.queue = queue

    def enhance(
        self,
        prompt: str,
        *,
        max_length: int | None = None,
        versions: int = 1,
        task_uuid: str | None = None,
        account: str | int | None = None,
        priority: str = "interactive",
        webhook_url: str | None = None,
    ) -> AsyncResult[Any]:
        """Validate and enqueue one enhancement; its AsyncResult. Raises
        `enhance_client.ValidationError` naming the field and its limit before anything is
        enqueued. `.get()` returns `{"taskType", "taskUUID", "prompt", "text", "texts", "cost",
        "totalCost"}`, or raises the job's failure."""
        request = enhance_request(
            prompt, max_length, versions, task_uuid, account, priority, webhook_url
        )
        kwargs = request.task_kwargs()
        return self.app.send_task(  # a webhookURL's token stays out of Flower
            "tasks.enhance_prompt",
            kwargs=kwargs,
            queue=self.queue,
            kwargsrepr=mask_urls(repr(kwargs)),
        )

    def result(self, sent: AsyncResult[Any], timeout: float | None = 60.0) -> dict[str, Any]:
        """Wait for a job's result from a thread; raises its failure (a timeout: TimeoutError
        naming the task id). Seen within milliseconds of being stored, however many other
        results this process waits for (enhance_client.waiting)."""
        value: dict[str, Any] = wait(sent, timeout)
        return value

    async def enhance_async(
        self, prompt: str, *, timeout: float | None = 60.0, **fields: Any
    ) -> dict[str, Any]:
        """Validate, enqueue and await one enhancement without blocking the event loop (one
        pub/sub connection per loop, no thread per request). Cancelling the await stops the
        wait, not the job."""
        sent = await off_loop(lambda: self.enhance(prompt, **fields))
        value: dict[str, Any] = await wait_async(sent, timeout)
        return value

    def close(self) -> None:
        """Close the connections of the client's own app."""
        if self._own_app:
            self.app.close()

    def __enter__(self) -> EnhanceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
