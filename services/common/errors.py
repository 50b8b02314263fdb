"""Errors shared across the package."""


class CliError(Exception):
    """A user-facing error: printed as one line by the CLI, no traceback."""


class ConfigError(ValueError):
    """A model or service configuration that cannot be used; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor key."""
