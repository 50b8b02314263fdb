"""structlog set-up shared by every service: one call in `main`, then `structlog.get_logger()`.

Events are stable snake_case names with data as keys:
`log.info("batch_scheduled", phase="prefill", seqs=n)`.
A TTY gets the coloured console renderer; anything else (a pod, a test's log file) gets one JSON
object per line on stderr, which is what log collectors parse.
"""

from __future__ import annotations

import logging as stdlib_logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import structlog

LEVELS = {
    "debug": stdlib_logging.DEBUG,
    "info": stdlib_logging.INFO,
    "warning": stdlib_logging.WARNING,
    "error": stdlib_logging.ERROR,
    "critical": stdlib_logging.CRITICAL,
}


def _identity_adder(service: str, rank: int | str | None) -> structlog.types.Processor:
    """Adds service/rank to every event, also from threads whose context is empty.

    Contextvars reach asyncio tasks created after binding, but not a thread pool's threads
    (grpc's sync server, `asyncio.to_thread`); this processor covers those.
    """

    def add_identity(_logger: Any, _method: str, event_dict: dict) -> dict:
        event_dict.setdefault("service", service)
        if rank is not None:
            event_dict.setdefault("rank", rank)
        return event_dict

    return add_identity


def configure_logging(
    service: str,
    rank: int | str | None = None,
    level: str = "info",
    json: bool | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Configures structlog for this process and binds `service` and `rank`.

    `json=None` picks the renderer from the stream: console on a TTY, JSON otherwise.
    `stream` defaults to stderr (stdout stays free for a command's own output).
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {sorted(LEVELS)}, got {level!r}")
    numeric_level = LEVELS[level.lower()]
    out = stream if stream is not None else _CurrentStderr()
    use_json = json if json is not None else not _is_tty(out)

    renderer: structlog.types.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))

    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _identity_adder(service, rank),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if use_json:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached, so `structlog.testing.capture_logs` also sees module-level loggers.
        cache_logger_on_first_use=False,
    )
    identity: dict[str, Any] = {"service": service}
    if rank is not None:
        identity["rank"] = rank
    structlog.contextvars.bind_contextvars(**identity)

    # Libraries (grpc, nats, asyncio) log through the standard library: same stream, warnings up.
    root = stdlib_logging.getLogger()
    root.setLevel(max(numeric_level, stdlib_logging.WARNING))
    for old in [h for h in root.handlers if getattr(h, "_epserve", False)]:
        root.removeHandler(old)
    handler = stdlib_logging.StreamHandler(out)
    handler.setFormatter(stdlib_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler._epserve = True  # type: ignore[attr-defined]
    root.addHandler(handler)


@contextmanager
def bind_request(request_id: str, **kw: Any) -> Iterator[None]:
    """Binds `request_id` (and any extra keys) to every event logged inside the block.

    Previous values of the same keys come back on exit, so nested requests are safe.
    """
    with structlog.contextvars.bound_contextvars(request_id=request_id, **kw):
        yield


class _CurrentStderr:
    """sys.stderr looked up at every write, not once: whoever swaps sys.stderr later (a test
    runner capturing output) never leaves the logger writing to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
