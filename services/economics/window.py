"""The usage window, the times inside it, and the readers of zones, clock times and date-times.

Times inside a window are whole seconds since its start (offsets), so that splitting and
apportioning stay in integers. Clock times ("08:30") are read in the window's zone and mapped
into it ("00:00" in a 12:00-to-12:00 window is 12 h in). Zones are fixed UTC offsets only
("UTC+8", "UTC-05:30"): across a DST change "HH:MM" would be ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from services.economics.spec import DataError, text

SECONDS_PER_DAY = 86_400
_ZONE = re.compile(r"^(?:UTC|GMT)?\s*(?:([+-])(\d{1,2})(?::?(\d{2}))?)?$", re.IGNORECASE)
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def zone(value: Any, path: str) -> timezone:
    """Reader: a fixed UTC offset."""
    raw = text(value, path)
    match = _ZONE.match(raw)
    if raw.upper() == "Z" or (match and not match[1] and raw.upper().startswith(("UTC", "GMT"))):
        return UTC
    if not match or not match[1]:
        raise DataError(path, f"must be a fixed UTC offset such as 'UTC' or 'UTC+8', got {raw!r}")
    if int(match[2]) > 14 or int(match[3] or 0) >= 60:
        raise DataError(path, f"offset out of range: {raw!r}")
    delta = timedelta(hours=int(match[2]), minutes=int(match[3] or 0))
    return timezone(-delta if match[1] == "-" else delta)


def clock(value: Any, path: str) -> int:
    """Reader: 'HH:MM' or 'HH:MM:SS' -> seconds since midnight; '24:00' is the end of the day."""
    raw = text(value, path)
    match = _CLOCK.match(raw)
    if not match:
        raise DataError(path, f"must be a clock time 'HH:MM' or 'HH:MM:SS', got {raw!r}")
    h, m, s = int(match[1]), int(match[2]), int(match[3] or 0)
    if m >= 60 or s >= 60 or h > 24 or (h == 24 and (m or s)):
        raise DataError(path, f"not a valid clock time: {raw!r}")
    return h * 3600 + m * 60 + s


def date_time(value: Any, path: str) -> datetime:
    """Reader: an ISO date-time, naive (read later in the window's zone) or with its offset."""
    raw = text(value, path)
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise DataError(path,
                        f"must be an ISO date-time like 2025-02-27T12:00, got {raw!r}") from None


def second_of_day(instant: datetime) -> int:
    return instant.hour * 3600 + instant.minute * 60 + instant.second


def moment(value: Any, path: str) -> int | datetime:
    """Reader: a clock time (int seconds since midnight) or a full date-time."""
    return clock(value, path) if _CLOCK.match(text(value, path)) else date_time(value, path)


@dataclass(frozen=True)
class Window:
    """[start, end) in absolute time; `tz` is the zone clock times in the usage file are read in."""

    start: datetime
    end: datetime
    tz: timezone

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window start and end must be timezone-aware")
        if self.end <= self.start or (self.end - self.start) % timedelta(seconds=1):
            raise ValueError("window end must be after its start, by whole seconds")

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())

    def at(self, offset: int) -> datetime:
        return (self.start + timedelta(seconds=offset)).astimezone(self.tz)

    def offset_of(self, instant: datetime) -> float:
        return (instant - self.start).total_seconds()

    def clock(self, offset: int) -> str:
        return self.at(offset).strftime("%H:%M:%S" if self.at(offset).second else "%H:%M")

    def daily_offsets(self, seconds_of_day: int, tz: timezone) -> list[int]:
        """Offsets strictly inside the window where the clock in `tz` reads `seconds_of_day`."""
        first = (seconds_of_day - second_of_day(self.start.astimezone(tz))) % SECONDS_PER_DAY
        return list(range(first or SECONDS_PER_DAY, self.seconds, SECONDS_PER_DAY))

    def hour_offsets(self) -> list[int]:
        """Local whole-hour boundaries strictly inside the window."""
        return sorted(t for hour in range(24) for t in self.daily_offsets(hour * 3600, self.tz))

    def hour_slots(self) -> list[tuple[int, int]]:
        """The window cut at its local whole hours."""
        edges = [0, *self.hour_offsets(), self.seconds]
        return list(zip(edges, edges[1:], strict=False))

    # ---- offsets of the moments a usage file gives (see `moment`) ----

    def offset(self, value: int | datetime, path: str) -> int:
        if isinstance(value, int):
            self._need_day(path)
            return (value - second_of_day(self.start.astimezone(self.tz))) % SECONDS_PER_DAY
        seconds = self.offset_of(value if value.tzinfo else value.replace(tzinfo=self.tz))
        if seconds != int(seconds):
            raise DataError(path, "must be a whole second")
        return int(seconds)

    def span(self, start: int | datetime, end: int | datetime | None, path: str) -> tuple[int, int]:
        """An interval of an entry at `path`. A clock-time `to` is the first such time after
        `from` (08:30 -> 12:00 is 3.5 h, 12:00 -> 12:00 a whole day); no `to`: one hour."""
        first = self.offset(start, f"{path}.from")
        end_path = f"{path}.from" if end is None else f"{path}.to"
        if end is None:
            last = first + 3600
        elif isinstance(end, int):
            self._need_day(end_path)
            length = (end - second_of_day(self.at(first))) % SECONDS_PER_DAY
            last = first + (length or SECONDS_PER_DAY)
        else:
            last = self.offset(end, end_path)
        self.check_inside(first, f"{path}.from")
        if last <= first:
            raise DataError(end_path, "must be after its 'from'")
        if last > self.seconds:
            raise DataError(end_path, "runs past the end of the usage window")
        return first, last

    def check_inside(self, offset: int, path: str) -> None:
        if not 0 <= offset < self.seconds:
            raise DataError(path, "lies outside the usage window")

    def _need_day(self, path: str) -> None:
        if self.seconds > SECONDS_PER_DAY:
            raise DataError(path, "clock times need a window of at most 24 h; give a date-time")
