"""The README's ASGI example, as written there, under a real uvicorn: 200 concurrent HTTP
requests, each enqueuing and awaiting an enhancement, on one event loop with a handful of
threads; a bad request gets 422 and enqueues nothing."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import RunningWorker, wait_until
from workers.sandbox import Sandbox
from workers.sandbox.services import free_port

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- asgi-example:"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER) :]
    found = re.search(r"```python\n(.*?)```", after, re.S)
    assert found is not None, "the README's ASGI example"
    return found[1]


def _post(port: int, body: dict[str, Any], account: str = "web") -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST",
            "/enhance",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "X-Account": account},
        )
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, {"raw": raw.decode(errors="replace")}
    finally:
        connection.close()


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def test_the_readme_asgi_example_serves_200_concurrent_requests(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(readme_example())
    port = free_port()
    env = {**os.environ, "REDIS_URL": main_worker.redis_url, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(tmp_path)),
            *("--port", str(port), "--log-level", "warning"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _listening(port), 30, "uvicorn listening")
        status, refused = _post(port, {"prompt": "a fox", "versions": 9})
        assert status == 422
        assert "promptVersions" in refused["error"]
        assert sandbox.state.requests == 0  # nothing was enqueued for it
        sandbox.configure(latency_s=0.2)  # the requests are all in flight at once
        peak_threads = 0
        with ThreadPoolExecutor(200) as pool:
            futures = [
                pool.submit(_post, port, {"prompt": f"a fox no. {n}", "versions": 2})
                for n in range(200)
            ]
            while not all(f.done() for f in futures):
                peak_threads = max(peak_threads, _threads(server.pid))
                time.sleep(0.02)
            answers = [f.result() for f in futures]
        statuses = [status for status, _ in answers]
        assert statuses == [200] * 200, (tmp_path / "uvicorn.log").read_text()[-2000:]
        assert all(len(body["texts"]) == 2 for _, body in answers)
        assert len(sandbox.state.accepted) == 200
        assert peak_threads <= 12, peak_threads  # one loop: no thread per request
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
