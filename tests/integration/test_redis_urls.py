"""Every Redis URL form config/redis.py accepts, end to end, with a real worker process: a
TLS-only Redis (rediss://, certificates made here) and a unix-socket-only Redis with a password
(unix://). Each time the producer is a plain Celery app configured as a user would, the fleet-wide
rate holds (the dispatcher and the limits reach Redis through the same URL), and the CLI works
against the URL. A certificate from the wrong CA is refused: verification is on by default.

Guards a past bug: the dispatcher's client dropped the connection class of rediss:// and
unix:// URLs (plain TCP to the default host), so jobs were never granted.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import redis
from celery import Celery

from enhance_client import wait
from tests.conftest import run_cli, worker_env
from tests.load.common import max_in_window
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import (
    READY,
    RedisServer,
    TLSFiles,
    WorkerProcess,
    redis_answers,
)

RATE = "10/s"
# Celery's consumer, failing to reach the broker because the server's certificate did not verify.
REFUSED = re.compile(r"Cannot connect to .*CERTIFICATE_VERIFY_FAILED")
# Special characters on purpose: the password must survive every URL translation.
SOCKET_PASSWORD = "pw-3e9a/@:#% x"

SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def _new_key(name: str) -> list[str]:
    """`openssl req` arguments for a new P-256 key without a passphrase (fast to make)."""
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", name]


def _make_ca(directory: Path, name: str) -> None:
    """A self-signed CA: `name`.pem and `name`.key in `directory`."""
    _openssl(
        "req", "-x509", "-new", *_new_key(f"{name}.key"), "-out", f"{name}.pem",
        "-days", "2", "-subj", f"/CN=enhance test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


@dataclass(frozen=True)
class Certificates:
    server: TLSFiles  # the server's certificate and key, and the CA that signed it
    other_ca: str  # a CA that has nothing to do with the server


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the `openssl` command line is not installed (it makes the test certificates)")
    directory = tmp_path_factory.mktemp("tls")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    _openssl(
        "req", "-new", *_new_key("server.key"), "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    # The certificates are right, so a server that will not start with them lacks TLS support.
    _openssl("verify", "-CAfile", "ca.pem", "server.pem", cwd=directory)
    return Certificates(
        server=TLSFiles(
            cert=str(directory / "server.pem"),
            key=str(directory / "server.key"),
            ca=str(directory / "ca.pem"),
        ),
        other_ca=str(directory / "other-ca.pem"),
    )


@pytest.fixture(scope="module")
def tls_redis(certificates: Certificates) -> Iterator[RedisServer]:
    """A redis-server that listens on a TLS port only (no plain TCP at all); its own TLS, or
    TLS terminated in front of it where the binary has none (the embedded Valkey)."""
    with RedisServer(tls=certificates.server) as server:
        yield server


def _assert_rate_held(sandbox: Sandbox, jobs: int) -> None:
    times = sandbox.state.call_times
    assert len(times) == jobs  # RUNWARE_BATCH_MAX=1: one request per job
    # The rate plus the burst of 1, plus one call sent late: grants are spaced, sends may not
    # be (a worker's first call loads its scripts and opens its connections before it leaves,
    # and can reach the API right before the next one). No limit at all would show `jobs`.
    assert max_in_window(times) <= 10 + 2


def _assert_limits_cli_works(url: str) -> None:
    """`enhance-worker limits` over `url`: a change written through it is read back."""
    run_cli(url, "limits", "global", "--rate", "10", "--json", timeout=60, check=True)
    shown = run_cli(url, "limits", "show", "--json", timeout=60)
    assert shown.returncode == 0, shown.stderr
    state = json.loads(shown.stdout)
    assert state["overrides"] == {"rate": 10.0}
    assert state["in_flight"] == 0


def _assert_clean_log(worker: WorkerProcess) -> None:
    log = worker.log()
    assert "lost Redis" not in log  # the dispatcher reached Redis on every step
    assert "Cannot connect" not in log


def _run_rate_limited_jobs(
    worker: WorkerProcess, producer: Celery, url: str, sandbox: Sandbox, count: int
) -> None:
    """Start the worker, run `count` jobs from the user's producer: all succeed, within the
    rate, the CLI reads the limits over the same URL, and the worker never lost Redis."""
    try:
        worker.start()
        pending = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"job {n}"})
            for n in range(count)
        ]
        assert all(p.get(timeout=30)["text"] for p in pending)
        # The waiting helpers reach the same backend through their own asyncio connections
        # (built from the backend's settings: TLS, or a socket and a password).
        more = producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "waited"})
        assert wait(more, timeout=30)["prompt"] == "waited"
        count += 1
        _assert_rate_held(sandbox, count)
        _assert_limits_cli_works(url)
    finally:
        producer.close()
        worker.stop()
    _assert_clean_log(worker)


def test_a_worker_on_a_tls_only_redis(
    tls_redis: RedisServer, certificates: Certificates, sandbox: Sandbox
) -> None:
    url = tls_redis.url(2)
    assert url.startswith("rediss://")
    assert "ssl_cert_reqs=required" in url
    worker = WorkerProcess(
        worker_env(url, sandbox, RUNWARE_RATE_LIMIT=RATE, RUNWARE_BATCH_MAX="1"), name="tls"
    )
    # How a user configures a Celery producer for a TLS Redis (Celery's documented settings).
    plain = f"rediss://127.0.0.1:{tls_redis.port}/2"
    verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": certificates.server.ca}
    producer = backend_app(broker=plain, backend=plain)
    producer.conf.broker_use_ssl = verify
    producer.conf.redis_backend_use_ssl = verify
    _run_rate_limited_jobs(worker, producer, url, sandbox, 25)


def test_tls_terminated_in_front_of_a_server_verifies_as_a_tls_server_does(
    certificates: Certificates,
) -> None:
    """The harness's TLS proxy (what serves TLS where the embedded Valkey has none), tested on
    every machine: it answers through TLS with the right CA, and a client checking against
    another CA is refused."""
    with RedisServer(tls=certificates.server, tls_proxy=True) as server:
        assert server.tls_proxy is not None
        client = redis.Redis.from_url(server.url(1))
        with contextlib.closing(client):
            client.set("through", "tls")
            assert client.get("through") == b"tls"
            assert client.blpop(["nothing"], timeout=0.2) is None  # a blocking call survives
        other = f"rediss://127.0.0.1:{server.port}/1?ssl_ca_certs={certificates.other_ca}"
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            redis.Redis.from_url(other).ping()
        with pytest.raises(redis.ConnectionError):  # no plain TCP on the port
            redis.Redis(port=server.port, socket_timeout=2).ping()


def test_a_worker_on_a_unix_socket_redis_with_a_password(sandbox: Sandbox) -> None:
    with RedisServer(password=SOCKET_PASSWORD, unix_socket=True) as server:
        url = server.url(3)
        assert url.startswith("unix://")
        worker = WorkerProcess(
            worker_env(url, sandbox, RUNWARE_RATE_LIMIT=RATE, RUNWARE_BATCH_MAX="1"),
            name="socket",
        )
        # How a user points a Celery producer at a unix socket (kombu's and Celery's form).
        path = urlsplit(url).path
        socket_url = f"redis+socket://:{quote(SOCKET_PASSWORD, safe='')}@{path}?virtual_host=3"
        producer = backend_app(broker=socket_url, backend=socket_url)
        _run_rate_limited_jobs(worker, producer, url, sandbox, 25)
    log = worker.log()
    assert SOCKET_PASSWORD not in log
    assert quote(SOCKET_PASSWORD, safe="") not in log


def test_a_certificate_from_another_ca_is_refused(
    tls_redis: RedisServer, certificates: Certificates, sandbox: Sandbox
) -> None:
    """No ssl_cert_reqs in the URL: the default must verify, so the worker does not connect."""
    url = f"rediss://127.0.0.1:{tls_redis.port}/4?ssl_ca_certs={certificates.other_ca}"
    # The server takes any client that does not check it: only verification can refuse it.
    assert redis_answers(f"rediss://127.0.0.1:{tls_redis.port}/4?ssl_cert_reqs=none")
    worker = WorkerProcess(worker_env(url, sandbox), name="wrong-ca")
    try:
        process = worker.start(wait=False).process
        assert process is not None
        deadline = time.monotonic() + 20
        while not REFUSED.search(worker.log()):  # the broker connection, refused by the check
            assert process.poll() is None, worker.log()[-3000:]  # it keeps trying, it never exits
            assert not READY.search(worker.log()), "the worker connected without verifying"
            assert time.monotonic() < deadline, f"no certificate error:\n{worker.log()[-3000:]}"
            time.sleep(0.05)
        assert not READY.search(worker.log())
        cli = run_cli(url, "limits", "show", "--json", timeout=60)
        assert cli.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in cli.stderr
    finally:
        worker.stop(timeout=5)
    assert not READY.search(worker.log())
    assert sandbox.state.call_times == []


def test_a_private_redis_whose_port_was_taken_meanwhile_picks_another() -> None:
    """free_port() releases the port it found; another process may bind it before
    redis-server does. The server then starts on another port, and never takes a stranger
    on its port for itself."""
    import socket

    import redis

    server = RedisServer()
    picked = server.port
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", picked))
        stranger.listen()
        server.start()
        try:
            assert server.port != picked
            client = redis.Redis.from_url(server.url(0))
            assert int(client.info("server")["process_id"]) == server.process.pid  # type: ignore[union-attr]
            client.close()
        finally:
            server.stop()
