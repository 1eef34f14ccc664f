"""Errors raised for bad configuration, with messages that say how to fix the problem."""


class ConfigError(ValueError):
    """A setting, path or input that cannot work; raised before any long work starts."""
