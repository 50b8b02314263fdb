"""The usage window and the times inside it.

Every time inside a day of usage is held as whole seconds since the window start (an `offset`),
which keeps splitting and apportioning in integers. Clock times such as "08:30" are read in the
window's timezone and mapped into the window (so "00:00" in a 12:00-to-12:00 window is 12 h in).
Only fixed UTC offsets are accepted as timezones ("UTC", "UTC+8", "UTC-05:30"): a day of usage
with a DST change would make "HH:MM" ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from services.economics.fields import DataError, join, required, text

SECONDS_PER_DAY = 86_400
_TZ = re.compile(r"^(?:UTC|GMT)?\s*(?:([+-])(\d{1,2})(?::?(\d{2}))?)?$", re.IGNORECASE)
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_timezone(value: Any, path: str) -> timezone:
    raw = text(value, path)
    match = _TZ.match(raw)
    if raw.upper() == "Z":
        return UTC
    if not match or (match.group(1) is None and not raw.upper().startswith(("UTC", "GMT"))):
        raise DataError(path, f"must be a fixed UTC offset such as 'UTC' or 'UTC+8', got {raw!r}")
    if match.group(1) is None:
        return UTC
    hours, minutes = int(match.group(2)), int(match.group(3) or 0)
    if hours > 14 or minutes >= 60:
        raise DataError(path, f"offset out of range: {raw!r}")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if match.group(1) == "-" else delta)


def parse_clock(value: Any, path: str) -> int:
    """'HH:MM' or 'HH:MM:SS' -> seconds since midnight; '24:00' is accepted as end of day."""
    raw = text(value, path)
    match = _CLOCK.match(raw)
    if not match:
        raise DataError(path, f"must be a clock time 'HH:MM' or 'HH:MM:SS', got {raw!r}")
    h, m, s = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if m >= 60 or s >= 60 or h > 24 or (h == 24 and (m or s)):
        raise DataError(path, f"not a valid clock time: {raw!r}")
    return h * 3600 + m * 60 + s


def is_clock(value: Any) -> bool:
    return isinstance(value, str) and bool(_CLOCK.match(value.strip()))


@dataclass(frozen=True)
class Window:
    """[start, end) in absolute time; `tz` is the zone clock times in the usage file are read in."""

    start: datetime
    end: datetime
    tz: timezone

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window start and end must be timezone-aware")
        if self.end <= self.start:
            raise ValueError("window end must be after its start")
        if (self.end - self.start) % timedelta(seconds=1):
            raise ValueError("window length must be whole seconds")

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())

    def at(self, offset: int) -> datetime:
        return (self.start + timedelta(seconds=offset)).astimezone(self.tz)

    def offset_of(self, instant: datetime) -> float:
        return (instant - self.start).total_seconds()

    def clock_seconds(self, offset: int) -> int:
        local = self.at(offset)
        return local.hour * 3600 + local.minute * 60 + local.second

    def clock(self, offset: int) -> str:
        local = self.at(offset)
        return local.strftime("%H:%M") if local.second == 0 else local.strftime("%H:%M:%S")

    def clock_offset(self, clock_seconds: int) -> int:
        return (clock_seconds - self.clock_seconds(0)) % SECONDS_PER_DAY

    def daily_offsets(self, clock_seconds: int, tz: timezone) -> list[int]:
        """Offsets strictly inside the window where the clock in `tz` reads `clock_seconds`."""
        first = self.start.astimezone(tz)
        midnight = first.replace(hour=0, minute=0, second=0, microsecond=0)
        instant = midnight + timedelta(seconds=clock_seconds % SECONDS_PER_DAY)
        while instant <= self.start:
            instant += timedelta(days=1)
        offsets = []
        while instant < self.end:
            offsets.append(int((instant - self.start).total_seconds()))
            instant += timedelta(days=1)
        return offsets

    def hour_offsets(self) -> list[int]:
        """Local whole-hour boundaries strictly inside the window."""
        return sorted(
            offset for hour in range(24) for offset in self.daily_offsets(hour * 3600, self.tz)
        )


def parse_window(doc: Mapping[str, Any], path: str) -> Window:
    tz = parse_timezone(required(doc, "timezone", path), join(path, "timezone"))
    start = _parse_datetime(required(doc, "from", path), tz, join(path, "from"))
    end = _parse_datetime(required(doc, "to", path), tz, join(path, "to"))
    if end <= start:
        raise DataError(join(path, "to"), "must be after window.from")
    return Window(start=start, end=end, tz=tz)


def parse_offset(value: Any, window: Window, path: str) -> int:
    """A clock time (read in the window's zone) or a full ISO date-time -> offset in seconds."""
    if is_clock(value):
        _require_day_window(window, path)
        return window.clock_offset(parse_clock(value, path))
    instant = _parse_datetime(value, window.tz, path)
    offset = window.offset_of(instant)
    if offset != int(offset):
        raise DataError(path, "must be a whole second")
    return int(offset)


def parse_span(
    start_value: Any, end_value: Any, window: Window, start_path: str, end_path: str
) -> tuple[int, int]:
    """An interval inside the window. A clock-time end is the first such time after the start
    (so 08:30 -> 12:00 is 3.5 h, and 12:00 -> 12:00 is a whole day)."""
    start = parse_offset(start_value, window, start_path)
    if is_clock(end_value):
        _require_day_window(window, end_path)
        length = (parse_clock(end_value, end_path) - window.clock_seconds(start)) % SECONDS_PER_DAY
        end = start + (length or SECONDS_PER_DAY)
    else:
        end = parse_offset(end_value, window, end_path)
    check_span(start, end, window, start_path, end_path)
    return start, end


def check_span(start: int, end: int, window: Window, start_path: str, end_path: str) -> None:
    if not 0 <= start < window.seconds:
        raise DataError(start_path, "lies outside the usage window")
    if end <= start:
        raise DataError(end_path, "must be after its 'from'")
    if end > window.seconds:
        raise DataError(end_path, "runs past the end of the usage window")


def _require_day_window(window: Window, path: str) -> None:
    if window.seconds > SECONDS_PER_DAY:
        raise DataError(path, "clock times need a window of at most 24 h; give a date-time")


def _parse_datetime(value: Any, tz: timezone, path: str) -> datetime:
    raw = text(value, path)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise DataError(
            path, f"must be an ISO date-time like 2025-02-27T12:00, got {raw!r}"
        ) from None
    return parsed.replace(tzinfo=tz) if parsed.tzinfo is None else parsed
