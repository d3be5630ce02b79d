"""config/redis.py's translations of a Redis URL for kombu, Celery's result backend and redis-py,
for every accepted form (redis://, rediss://, unix://). No server: nothing here connects."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from urllib.parse import quote

import pytest
import redis
from celery import Celery
from kombu.utils.url import url_to_parts

from config import redis as redis_urls
from config.celery import create_app
from config.settings import load_settings
from config.transport import Transport

CA = "/etc/enhance/ca.pem"
PASSWORD = "pw-5d2c/@:#% x"  # characters that must be quoted in a URL
QUOTED = quote(PASSWORD, safe="")


# --- redis:// -------------------------------------------------------------------------------
def test_a_plain_url_is_taken_as_it_is() -> None:
    url = f"redis://:{QUOTED}@db.internal:6380/5"
    assert redis_urls.broker_options(url) == (url, None)
    assert redis_urls.backend_url(url) == url
    assert redis_urls.ssl_options(url) is None


# --- rediss:// ------------------------------------------------------------------------------
def test_tls_options_move_from_the_query_to_the_ssl_settings() -> None:
    url = (
        f"rediss://:{QUOTED}@db.internal:6380/5?ssl_cert_reqs=required&ssl_ca_certs={CA}"
        "&ssl_certfile=/etc/enhance/client.pem&ssl_keyfile=/etc/enhance/client.key"
        "&ssl_check_hostname=false"
    )
    options = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": CA,
        "ssl_certfile": "/etc/enhance/client.pem",
        "ssl_keyfile": "/etc/enhance/client.key",
        "ssl_check_hostname": False,
    }
    stripped = f"rediss://:{QUOTED}@db.internal:6380/5"
    assert redis_urls.broker_options(url) == (stripped, options)
    assert redis_urls.backend_url(url) == stripped
    assert redis_urls.ssl_options(url) == options


def test_tls_verifies_certificates_unless_told_not_to() -> None:
    url = "rediss://db.internal:6380/0"
    assert redis_urls.ssl_options(url) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert redis_urls.broker_options(url) == (url, {"ssl_cert_reqs": ssl.CERT_REQUIRED})
    only_ca = redis_urls.ssl_options(f"{url}?ssl_ca_certs={CA}")
    assert only_ca == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": CA}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("required", ssl.CERT_REQUIRED),
        ("CERT_REQUIRED", ssl.CERT_REQUIRED),
        ("optional", ssl.CERT_OPTIONAL),
        ("none", ssl.CERT_NONE),
        ("CERT_NONE", ssl.CERT_NONE),
        ("nonsense", ssl.CERT_REQUIRED),  # an unknown value never turns verification off
        ("", ssl.CERT_REQUIRED),
    ],
)
def test_ssl_cert_reqs_spellings(given: str, expected: ssl.VerifyMode) -> None:
    options = redis_urls.ssl_options(f"rediss://db.internal/0?ssl_cert_reqs={given}")
    assert options is not None
    assert options["ssl_cert_reqs"] == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [("true", True), ("1", True), ("false", False), ("0", False), ("no", False)],
)
def test_ssl_check_hostname_spellings(given: str, expected: bool) -> None:
    options = redis_urls.ssl_options(f"rediss://db.internal/0?ssl_check_hostname={given}")
    assert options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": expected}


def test_other_query_options_stay_in_the_url() -> None:
    url = f"rediss://db.internal/0?ssl_ca_certs={CA}&health_check_interval=10"
    expected = "rediss://db.internal/0?health_check_interval=10"
    assert redis_urls.broker_options(url)[0] == expected
    assert redis_urls.backend_url(url) == expected


# --- unix:// --------------------------------------------------------------------------------
def test_a_unix_socket_becomes_kombus_socket_form_with_its_database() -> None:
    url = f"unix://:{QUOTED}@/run/redis/redis.sock?db=3"
    socket_url = f"socket://:{QUOTED}@/run/redis/redis.sock?virtual_host=3"
    assert redis_urls.broker_options(url) == (f"redis+{socket_url}", None)
    assert redis_urls.backend_url(url) == socket_url
    assert redis_urls.ssl_options(url) is None
    parts = url_to_parts(socket_url)  # as kombu and Celery's backend read it
    assert parts.password == PASSWORD
    assert parts.path == "run/redis/redis.sock"
    assert parts.query == {"virtual_host": "3"}


def test_a_unix_socket_without_password_or_database() -> None:
    url = "unix:///run/redis/redis.sock"
    expected = "socket:///run/redis/redis.sock?virtual_host=0"
    assert redis_urls.broker_options(url) == (f"redis+{expected}", None)
    assert redis_urls.backend_url(url) == expected


# --- the clients built from them ------------------------------------------------------------
def _connection(client: redis.Redis) -> tuple[type, dict[str, object]]:
    pool = client.connection_pool
    return pool.connection_class, pool.connection_kwargs


def test_redis_py_clients_keep_the_connection_class_and_password() -> None:
    """config.redis.client, which the dispatcher, limits and ledger use (the past bug: it
    dropped the connection class of rediss:// and unix:// URLs)."""
    kind, kwargs = _connection(
        redis_urls.client(f"rediss://:{QUOTED}@db.internal:6380/5?ssl_ca_certs={CA}")
    )
    assert issubclass(kind, redis.SSLConnection)
    assert kwargs["password"] == PASSWORD
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("db.internal", 6380, 5)
    pool = redis_urls.client(f"rediss://db.internal/0?ssl_ca_certs={CA}").connection_pool
    made = pool.make_connection()  # not connected: what it would check
    assert isinstance(made, redis.SSLConnection)
    assert made.cert_reqs == ssl.CERT_REQUIRED
    assert made.ca_certs == CA
    assert made.check_hostname

    kind, kwargs = _connection(redis_urls.client(f"unix://:{QUOTED}@/run/redis/redis.sock?db=3"))
    assert issubclass(kind, redis.UnixDomainSocketConnection)
    assert (kwargs["path"], kwargs["db"], kwargs["password"]) == (
        "/run/redis/redis.sock",
        3,
        PASSWORD,
    )


AppFor = Callable[[str], Celery]


@pytest.fixture
def app_for() -> Iterator[AppFor]:
    """The project's Celery app for a REDIS_URL (built, never connected)."""
    apps: list[Celery] = []

    def make(url: str) -> Celery:
        app = create_app(load_settings(redis_url=url))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def _transport(app: Celery) -> type:
    """The transport class kombu picks for the app's broker URL (no connection is made)."""
    with app.connection_for_write() as connection:
        return type(connection.transport)


def test_the_celery_app_for_a_tls_url(app_for: AppFor) -> None:
    url = f"rediss://:{QUOTED}@db.internal:6380/5?ssl_ca_certs={CA}"
    app = app_for(url)
    conf = app.conf
    assert conf.broker_url == f"rediss://:{QUOTED}@db.internal:6380/5"
    assert _transport(app) is Transport
    verify = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": CA}
    assert conf.broker_use_ssl == verify
    assert conf.redis_backend_use_ssl == verify
    assert (
        conf.result_backend == f"config.backend:ResultStore+rediss://:{QUOTED}@db.internal:6380/5"
    )
    params = app.backend.connparams  # type: ignore[attr-defined]  # Celery's RedisBackend's
    assert issubclass(params["connection_class"], redis.SSLConnection)
    assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert params["ssl_ca_certs"] == CA
    assert (params["host"], params["port"], params["db"]) == ("db.internal", 6380, 5)
    assert params["password"] == PASSWORD


def test_the_celery_app_for_a_unix_socket(app_for: AppFor) -> None:
    app = app_for(f"unix://:{QUOTED}@/run/redis/redis.sock?db=3")
    conf = app.conf
    assert conf.broker_url == f"redis+socket://:{QUOTED}@/run/redis/redis.sock?virtual_host=3"
    assert _transport(app) is Transport
    assert conf.broker_use_ssl is None
    assert conf.redis_backend_use_ssl is None
    params = app.backend.connparams  # type: ignore[attr-defined]  # Celery's RedisBackend's
    assert issubclass(params["connection_class"], redis.UnixDomainSocketConnection)
    assert (params["path"], params["db"], params["password"]) == (
        "/run/redis/redis.sock",
        3,
        PASSWORD,
    )
    assert "host" not in params


def test_the_celery_app_for_a_plain_url(app_for: AppFor) -> None:
    app = app_for("redis://db.internal:6380/5")
    assert app.conf.broker_url == "redis://db.internal:6380/5"
    assert _transport(app) is Transport
    assert app.conf.broker_use_ssl is None
    assert app.conf.redis_backend_use_ssl is None


def test_a_sentinel_url_names_its_sentinels_database_and_the_masters_password() -> None:
    hosts, db, user, password = redis_urls.sentinel_parts(
        f"sentinel://app:{QUOTED}@s1:26379/4;sentinel://s2/4;sentinel://10.0.0.3:26380/4"
    )
    assert hosts == [("s1", 26379), ("s2", 26379), ("10.0.0.3", 26380)]
    assert (db, user, password) == (4, "app", PASSWORD)
    # kombu and Celery take the sentinel:// form as it is.
    url = "sentinel://s1:26379/0;sentinel://s2:26379/0"
    assert redis_urls.broker_options(url) == (url, None)
    assert redis_urls.backend_url(url) == url
