"""Settings: defaults, overrides, and one-line errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, format_rate, load_settings, parse_rate


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "RUNWARE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(_env_file=None)
    assert settings.runware_api_url == "https://api.runware.ai/v1"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.broker_url == settings.result_backend == settings.redis_url
    assert settings.runware_api_key is None
    assert settings.worker_pool == "threads"


def test_broker_and_backend_override_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://b:6379/1")
    settings = load_settings(_env_file=None)
    assert settings.broker_url == "redis://b:6379/1"
    assert settings.result_backend == "redis://r:6379/0"


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("RUNWARE_TIMEOUT_S", "abc", "a number > 0"),
        ("RUNWARE_TIMEOUT_S", "0", "a number > 0"),
        ("RUNWARE_MAX_RETRIES", "-1", "an integer 0..100"),
        ("RUNWARE_API_URL", "ftp://x", "http(s) URL"),
        ("REDIS_URL", "localhost", "redis://"),
        ("WORKER_POOL", "fork", "threads"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, accepts: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{variable}={value!r}" in message
    assert accepts in message


def test_the_key_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWARE_API_KEY", "very-secret-value")
    settings = load_settings(_env_file=None)
    assert settings.runware_api_key is not None
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in str(settings.model_dump())


def test_a_keys_trailing_newline_is_dropped_and_a_stray_character_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key read from a file keeps its newline; one holding a space or a control character
    inside is refused at start, naming the variable and never echoing the key (requests would
    otherwise refuse each call's header in an error that quotes it)."""
    monkeypatch.setenv("RUNWARE_API_KEY", "very-secret-value\n")
    settings = load_settings(_env_file=None)
    assert settings.runware_api_key is not None
    assert settings.runware_api_key.get_secret_value() == "very-secret-value"
    for stray in ("very-secret value", "very-secret\nvalue", "very-secret\x00value"):
        with pytest.raises(ConfigError, match=r"RUNWARE_API_KEY='<hidden>' is not accepted") as err:
            load_settings(_env_file=None, runware_api_key=stray)
        assert "very-secret" not in str(err.value)


def test_a_broker_that_is_not_redis_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"CELERY_BROKER_URL must be a Redis URL"):
        load_settings(_env_file=None, celery_broker_url="amqp://guest@localhost//")
    with pytest.raises(ConfigError, match=r"REDIS_URL must be a Redis URL"):
        load_settings(_env_file=None, redis_url="amqp://h1:5672")


def test_a_sentinel_url_needs_the_masters_name() -> None:
    url = "sentinel://:pw@h1:26379/2;sentinel://h2:26380/2"
    with pytest.raises(
        ConfigError, match=r"REDIS_URL is a sentinel:// URL: set REDIS_SENTINEL_MAS"
    ):
        load_settings(_env_file=None, redis_url=url)
    settings = load_settings(
        _env_file=None,
        redis_url=url,
        redis_sentinel_master="mymaster",
        redis_sentinel_password="sentinel-secret",
    )
    assert settings.sentinel is not None
    assert settings.sentinel.transport_options() == {
        "master_name": "mymaster",
        "sentinel_kwargs": {"password": "sentinel-secret"},
    }
    assert "sentinel-secret" not in repr(settings)
    with pytest.raises(ConfigError, match=r"LIMITER_REDIS_URL: not a sentinel address"):
        load_settings(
            _env_file=None,
            limiter_redis_url="sentinel://h1:26379;redis://h2:6379",
            redis_sentinel_master="m",
        )


def test_a_reservation_must_outlast_the_time_a_job_takes_to_come_back() -> None:
    """A reservation whose job has not run for RUNWARE_RESERVATION_S is checked with Runware; a
    job that is only waiting for its redelivery or its retry must not look dead."""
    with pytest.raises(ConfigError, match=r"RUNWARE_RESERVATION_S=500 must be longer") as caught:
        load_settings(_env_file=None, runware_reservation_s=500, celery_visibility_timeout_s=300)
    assert "(600s: CELERY_VISIBILITY_TIMEOUT_S + the longest of" in str(caught.value)
    assert load_settings(_env_file=None, runware_reservation_s=601).runware_reservation_s == 601


@pytest.mark.parametrize(("value", "stored"), [("", None), ("none", None), ("NONE", None)])
def test_results_are_compressed_unless_none_is_asked(
    monkeypatch: pytest.MonkeyPatch, value: str, stored: str | None
) -> None:
    assert load_settings(_env_file=None).celery_result_compression == "zlib"
    monkeypatch.setenv("CELERY_RESULT_COMPRESSION", value)
    assert load_settings(_env_file=None).celery_result_compression == stored
    monkeypatch.setenv("CELERY_RESULT_COMPRESSION", "Gzip")
    assert load_settings(_env_file=None).celery_result_compression == "gzip"
    # ("none" means no compression; it is not a budget: a budget takes a number or nothing)
    monkeypatch.setenv("RUNWARE_DAILY_BUDGET_USD", "none")
    with pytest.raises(ConfigError, match="RUNWARE_DAILY_BUDGET_USD='none'"):
        load_settings(_env_file=None)


def test_a_log_level_in_any_case_is_accepted() -> None:
    assert load_settings(_env_file=None, log_level="info").log_level == "INFO"
    with pytest.raises(ConfigError, match="LOG_LEVEL='LOUD'"):
        load_settings(_env_file=None, log_level="loud")


@pytest.mark.parametrize("value", ["justuser9", "ann7:pw1,justuser9", ":s3cr3t9", "user9:"])
def test_flower_auth_needs_user_colon_password_and_never_shows_it(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, flower_basic_auth=value)
    message = str(caught.value)
    assert "FLOWER_BASIC_AUTH='<hidden>' is not accepted (entry" in message
    assert "is not user:password" in message
    for part in filter(None, value.replace(",", ":").split(":")):
        assert part not in message


def test_several_flower_users_are_accepted() -> None:
    settings = load_settings(_env_file=None, flower_basic_auth="ann:pw1,bob:p:w2")
    assert settings.flower_basic_auth is not None


@pytest.mark.parametrize(
    ("text", "shown"),
    [("20/m", "20/m"), ("5", "5/s"), ("2.5/s", "2.5/s"), ("7/h", "7/h"), ("30/m", "30/m")],
)
def test_a_rate_is_shown_in_the_unit_it_was_set_in(text: str, shown: str) -> None:
    assert format_rate(parse_rate(text) or 0.0) == shown


@pytest.mark.parametrize(("value", "port"), [("", None), ("0", 0), ("9808", 9808)])
def test_metrics_port_zero_is_any_free_port_and_blank_is_none(
    monkeypatch: pytest.MonkeyPatch, value: str, port: int | None
) -> None:
    monkeypatch.setenv("METRICS_PORT", value)
    assert load_settings().metrics_port == port


def test_a_misspelled_variable_is_named_with_the_setting_it_may_mean() -> None:
    from config.settings import unknown_variables

    lines = unknown_variables(
        {
            "RUNWARE_RATE_LIMT": "5",  # a typo
            "REDIS_PASWORD": "x",  # none close enough to suggest
            "RUNWARE_RATE_LIMIT": "5",  # a setting
            "CELERY_CONFIG_MODULE": "x",  # Celery's own
            "LOG_LEVEL": "trace",  # not under a checked prefix
            "runware_timeout_s": "3",  # any case, as the settings read it
        }
    )
    assert lines == [
        "REDIS_PASWORD is set but is not a setting of this service (ignored)",
        "RUNWARE_RATE_LIMT is set but is not a setting of this service (ignored); "
        "did you mean RUNWARE_RATE_LIMIT?",
    ]


def test_a_misspelled_variable_in_the_env_file_is_named_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config.settings import unknown_variables

    (tmp_path / ".env").write_text("RUNWARE_MAX_RETRIE=2\nRUNWARE_MAX_RETRIES=2\n")
    monkeypatch.chdir(tmp_path)
    assert any(line.startswith("RUNWARE_MAX_RETRIE is set") for line in unknown_variables())
