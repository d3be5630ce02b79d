"""Configuration: the one place that reads the environment, and the Celery app built from it."""

from config.settings import ConfigError, Settings, get_settings

__all__ = ["ConfigError", "Settings", "get_settings"]
