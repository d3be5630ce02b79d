"""The settings as documentation, generated from `Settings` so that it cannot drift from the code:
`deploy/systemd/env.example` is `python -m config.reference` (`./run docs` rewrites it), and
tests/unit/test_deploy.py checks that the file, and the defaults in the README's settings table,
match it."""

from __future__ import annotations

import sys
import textwrap
from typing import Any

from pydantic_core import PydanticUndefined

from config.settings import Settings

HEADER = """\
# /etc/enhance-worker/env - read by enhance-worker.service and enhance-flower.service
# (EnvironmentFile=). KEY=value per line, no `export`, no spaces around `=`.
#   sudo install -d -m 0750 -o root -g enhance /etc/enhance-worker
#   sudo install -m 0640 -o root -g enhance deploy/systemd/env.example /etc/enhance-worker/env
# Generated from config/settings.py by `./run docs`: every setting, with what it accepts.
# A line `# NAME=value` shows the default; uncomment it to change it.
"""
# What a production host sets beyond the defaults.
DEPLOY_VALUES = {
    "RUNWARE_API_KEY": "REPLACE_ME-runware-api-key",
    "FLOWER_BASIC_AUTH": "REPLACE_ME-user:REPLACE_ME-password",
    "REDIS_URL": "redis://localhost:6379/0",
    "WORKER_SOFT_SHUTDOWN_S": "30",
    "METRICS_PORT": "9808",
    "LOG_FORMAT": "json",
}
# Advice for a host that the descriptions (which say what a value accepts) leave out.
NOTES = {
    "REDIS_URL": "Redis must run with appendonly yes and maxmemory-policy noeviction; the broker "
    "must be Redis (the fleet's limits and fair queues live in it).",
    "WORKER_SOFT_SHUTDOWN_S": "Keep the units' TimeoutStopSec above it.",
    "CELERY_VISIBILITY_TIMEOUT_S": "Countdowns are kept in Redis, so it need not outlast them.",
}


def default_text(value: Any) -> str:
    """A default as it is written in an env file: empty for none, 30 rather than 30.0."""
    if value is None or value is PydanticUndefined:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def defaults() -> dict[str, str]:
    """Every setting's environment variable and its default, as written in an env file."""
    return {
        name.upper(): default_text(field.default) for name, field in Settings.model_fields.items()
    }


def env_example() -> str:
    """The env file of deploy/systemd: every setting, its description, and its default."""
    lines = [HEADER.rstrip("\n")]
    for name, field in Settings.model_fields.items():
        variable = name.upper()
        about = f"{variable}: {field.description or ''}"
        if variable in NOTES:
            about += f". {NOTES[variable]}"
        lines.append("")
        lines.extend(textwrap.wrap(about, width=98, initial_indent="# ", subsequent_indent="# "))
        if variable in DEPLOY_VALUES:
            lines.append(f"{variable}={DEPLOY_VALUES[variable]}")
        else:
            lines.append(f"# {variable}={default_text(field.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(env_example())
