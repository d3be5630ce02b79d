"""Flower sees the jobs that wait in the fair intake: a task-sent event for each job the fleet's
dispatcher takes in and leaves waiting.

Flower learns of a job from Celery's events. A producer sends `task-sent` only when it has
`task_send_sent_event` set (neither the project's helpers nor a plain `send_task` do), and the
worker sends `task-received` only once the job is granted: with a backlog in the fair intake,
Flower knew only the jobs already running. The dispatcher, which reads every message as it
takes it in (tasks/messages.py), sends the event for it: Flower lists each job as SENT from
the moment the fleet has it, with its name and (masked) argument reprs. A job whose producer
sent the event too is simply seen twice in the SENT state. A job granted in the step that takes
it in gets none: a worker thread takes it at once, and its task-received event (name, arguments
and all) reaches Flower a moment later, as for any plain Celery producer; in a burst, building
and publishing those events was a quarter of the dispatcher thread's CPU.

A dispatcher step's events leave in one message (Celery's `task.multi` form, a list of events,
as the worker's own buffered task events do), not one `PUBLISH` each: building and publishing a
message per job took the GIL from the consumer's thread on the path of every job.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Celery

from tasks.messages import Read
from tasks.redact import redact

logger = logging.getLogger(__name__)

# Events in one published message at most (a step takes in at most a few hundred jobs).
MAX_PER_MESSAGE = 500


class IntakeEvents:
    """Sends task-sent events for jobs taken into the fair intake that wait there (called by the
    dispatcher's thread only: the connection is its own)."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue
        self._sender: Any = None
        self._failing = False

    def __call__(self, jobs: list[Read]) -> None:
        try:
            sender = self._sender
            if sender is None:
                connection = self.app.connection_for_write()
                sender = self._sender = self.app.events.Dispatcher(
                    connection,
                    hostname=f"fair-intake@{socket.gethostname()}",
                    enabled=True,
                    buffer_group=["task"],
                    buffer_limit=MAX_PER_MESSAGE,
                )
            for job in jobs:
                sender.send(
                    "task-sent",
                    uuid=job.task_id,
                    name=job.task,
                    args=redact(job.argsrepr),
                    kwargs=redact(job.kwargsrepr),
                    retries=job.retries,
                    eta=None,
                    expires=None,
                    queue=self.queue,
                    exchange="",
                    routing_key=self.queue,
                    root_id=None,
                    parent_id=None,
                )
            sender.flush()
            self._failing = False
        except Exception as exc:  # Flower's view must never stop the pump
            if not self._failing:
                logger.warning("Could not send task-sent events for Flower: %s", exc)
            self._failing = True
            self.close()

    def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            try:
                sender.close()
                sender.connection.release()
            except Exception as exc:  # closing a broken connection
                logger.debug("Closing the event connection: %s", exc)
