"""The project's app with Celery's built-in per-worker `rate_limit="20/s"` on enhance_prompt,
and no global limit: the comparison the rate-limit benchmark runs
(`celery -A tests.load.builtin_rate worker`).
"""

from workers import app

app.conf.task_annotations = {"tasks.enhance_prompt": {"rate_limit": "20/s"}}

__all__ = ["app"]
