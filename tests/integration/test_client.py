"""The producer client inside someone else's app: an app with its own `config.py`, `tasks.py`
and a `.env` the worker's settings would refuse enqueues, validates and awaits through
`enhance_client`, which imports nothing of the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import StartWorker

APP = """
import asyncio, json, sys

import config  # the app's own modules, which share the worker's package names
import tasks

from enhance_client import EnhanceClient, ValidationError

out = {"config": config.__file__, "tasks": tasks.__file__}
with EnhanceClient(sys.argv[1]) as client:
    try:
        client.enhance("a lake", versions=9)
    except ValidationError as exc:
        out["invalid"] = str(exc)
    out["result"] = asyncio.run(
        client.enhance_async("a lighthouse at dusk", account=12345, priority="batch", timeout=60)
    )
    out["modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("config", "tasks", "workers")
    )
print(json.dumps(out))
"""


def test_a_producer_app_with_its_own_config_and_tasks_enqueues_validates_and_awaits(
    start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker("client")
    (tmp_path / "config.py").write_text("LOG_LEVEL = 'trace'\n")
    (tmp_path / "tasks.py").write_text("def mine() -> None: ...\n")
    (tmp_path / ".env").write_text("LOG_LEVEL=trace\nREDIS_URL=not-a-url\nRUNWARE_TIMEOUT_S=abc\n")
    (tmp_path / "app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "app.py", worker.redis_url],
        cwd=tmp_path,
        env={**env, "LOG_LEVEL": "trace"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["config"] == str(tmp_path / "config.py")
    assert out["tasks"] == str(tmp_path / "tasks.py")
    assert out["modules"] == ["config", "tasks"]  # nothing of the worker's was imported
    assert "promptVersions" in out["invalid"]
    assert "5" in out["invalid"]  # the limit
    assert out["result"]["text"]
    assert out["result"]["cost"] > 0
