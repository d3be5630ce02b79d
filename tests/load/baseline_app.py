"""The baseline of the throughput benchmark: a minimal Celery worker (threads pool, one
`requests.post` per task, nothing else), as a user might write it without this project.

    celery -A tests.load.baseline_app worker -P threads -c 200
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import requests
from celery import Celery

# The benchmark passes these in the environment of this throwaway process only.
URL = os.environ.get("BASELINE_REDIS_URL", "redis://localhost:6379/0")
API = os.environ.get("BASELINE_API_URL", "http://127.0.0.1:8787/v1")

app = Celery("baseline", broker=URL, backend=URL)
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=200))


@app.task(name="baseline.enhance")
def enhance(prompt: str) -> dict[str, Any]:
    body = [
        {
            "taskType": "promptEnhance",
            "taskUUID": str(uuid.uuid4()),
            "model": "runware:llama-3-1-8b@prompt-enhancer",
            "prompt": prompt,
            "includeCost": True,
        }
    ]
    response = session.post(
        API,
        data=json.dumps(body),
        timeout=30,
        headers={"Authorization": "Bearer bench-key", "Content-Type": "application/json"},
    )
    item: dict[str, Any] = response.json()["data"][0]
    return item
