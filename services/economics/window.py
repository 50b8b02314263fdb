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

from services.economics.spec import DataError, Obj, join, text

SECONDS_PER_DAY = 86_400
_ZONE = re.compile(r"^(?:UTC|GMT|Z)?\s*(?:([+-])(\d{1,2})(?::?(\d{2}))?)?$", re.IGNORECASE)
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def zone(value: Any, path: str) -> timezone:
    """Reader: a fixed UTC offset ('UTC', 'Z', 'UTC+8', 'GMT-03:30')."""
    raw = text(value, path)
    if not (match := _ZONE.match(raw)):
        raise DataError(path, f"must be a fixed UTC offset such as 'UTC' or 'UTC+8', got {raw!r}")
    if not match[1]:
        return UTC
    if int(match[2]) > 14 or int(match[3] or 0) >= 60:
        raise DataError(path, f"offset out of range: {raw!r}")
    delta = timedelta(hours=int(match[2]), minutes=int(match[3] or 0))
    return timezone(-delta if match[1] == "-" else delta)


def clock(value: Any, path: str) -> int:
    """Reader: 'HH:MM' or 'HH:MM:SS' -> seconds since midnight; '24:00' is the end of the day."""
    if not (match := _CLOCK.match(raw := text(value, path))):
        raise DataError(path, f"must be a clock time 'HH:MM' or 'HH:MM:SS', got {raw!r}")
    h, m, s = int(match[1]), int(match[2]), int(match[3] or 0)
    if m >= 60 or s >= 60 or h > 24 or (h == 24 and (m or s)):
        raise DataError(path, f"not a valid clock time: {raw!r}")
    return h * 3600 + m * 60 + s


def date_time(value: Any, path: str) -> datetime:
    """Reader: an ISO date-time in whole seconds, naive (read in the window's zone) or not."""
    try:
        instant = datetime.fromisoformat(raw := text(value, path))
    except ValueError:
        raise DataError(path,
                        f"must be an ISO date-time like 2025-02-27T12:00, got {raw!r}") from None
    if instant.microsecond:
        raise DataError(path, "must be a whole second")
    return instant


def moment(value: Any, path: str) -> int | datetime:
    """Reader: a clock time (int seconds since midnight) or a full date-time."""
    return clock(value, path) if _CLOCK.match(text(value, path)) else date_time(value, path)


def usage_window(value: Any, path: str) -> Window:
    """Reader: {timezone, from, to}; a date-time without its offset is read in `timezone`."""
    w = Obj({"timezone": zone, "from": date_time, "to": date_time})(value, path)
    start, end = (t if t.tzinfo else t.replace(tzinfo=w["timezone"]) for t in (w["from"], w["to"]))
    if end <= start:
        raise DataError(join(path, "to"), f"must be after {join(path, 'from')}")
    return Window(start, end, w["timezone"])


def second_of_day(instant: datetime) -> int:
    return instant.hour * 3600 + instant.minute * 60 + instant.second


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

    def offset(self, value: int | datetime, path: str) -> int:
        """The offset of a `moment` read from the usage file at `path`."""
        if isinstance(value, datetime):
            return int(((value if value.tzinfo else value.replace(tzinfo=self.tz))
                        - self.start).total_seconds())
        if self.seconds > SECONDS_PER_DAY:
            raise DataError(path, "clock times need a window of at most 24 h; give a date-time")
        return (value - second_of_day(self.start.astimezone(self.tz))) % SECONDS_PER_DAY

    def span(self, start: int | datetime, end: int | datetime | None, path: str) -> tuple[int, int]:
        """An entry's [from, to) at `path`. A clock-time `to` is the first such time after `from`
        (08:30 -> 12:00 is 3.5 h, 12:00 -> 12:00 a whole day); no `to`: one hour."""
        first = self.offset(start, f"{path}.from")
        end_path = f"{path}.{'from' if end is None else 'to'}"
        if end is None:
            last = first + 3600
        elif isinstance(end, datetime):
            last = self.offset(end, end_path)
        else:
            ahead = (self.offset(end, end_path) - first) % SECONDS_PER_DAY
            last = first + (ahead or SECONDS_PER_DAY)
        if not 0 <= first < self.seconds:
            raise DataError(f"{path}.from", "lies outside the usage window")
        if last <= first:
            raise DataError(end_path, "must be after its 'from'")
        if last > self.seconds:
            raise DataError(end_path, "runs past the end of the usage window")
        return first, last
