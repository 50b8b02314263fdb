"""Errors shared across the package."""

from __future__ import annotations

import grpc


class CliError(Exception):
    """A user-facing error: printed as one line by the CLI, no traceback."""


class ConfigError(ValueError):
    """A model or service configuration that cannot be used; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor key."""


class StatusError(Exception):
    """An error that ends a call with a gRPC status (the router maps it to HTTP too).

    `code` is the status's name ("UNAVAILABLE"), as protos and metrics labels carry it;
    `status` is the grpc.StatusCode; `message` names the request or the peer.
    """

    def __init__(self, code: str | grpc.StatusCode, message: str) -> None:
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        if name not in grpc.StatusCode.__members__:
            raise ValueError(f"not a gRPC status code: {code!r}")
        super().__init__(message)
        self.code, self.message = name, message

    @property
    def status(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]
