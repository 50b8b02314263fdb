"""Which pages are resident, and which to evict: LRU over leaves only (pure, no I/O).

A page is useful only with its whole prefix, so eviction is prefix-closed: a page is never a
victim while one of its children is resident. Only leaves are victims, least recently used
first; evicting a leaf may make its parent a leaf, and victims() takes that into account
within one call (children come before their parent in the list it returns).

Leaves sit in a heap with lazy invalidation: an entry is live while its page is resident, is a
leaf and still carries that entry's sequence number (a touch or a new child retires it). Dead
entries are dropped when they reach the top, and the heap is rebuilt when it holds more than
twice as many entries as there are pages, so a victims() call costs O(k log n) for k victims
rather than a scan of every page.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from services.prefix_cache.keys import NO_PARENT

_Entry = tuple[float, int, bytes]  # (last use, sequence, key)


@dataclass
class _Page:
    parent: bytes
    nbytes: int
    last_use: float
    seq: int = 0  # the sequence number of its live heap entry, when a leaf


class PageIndex:
    def __init__(self) -> None:
        self._pages: dict[bytes, _Page] = {}
        self._children: dict[bytes, int] = {}  # parent key -> resident children (parent may be absent)
        self._leaves: list[_Entry] = []
        self._seq = 0
        self._total = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._pages))

    @property
    def total_bytes(self) -> int:
        return self._total

    def parent(self, key: bytes) -> bytes | None:
        page = self._pages.get(key)
        return None if page is None else page.parent

    def nbytes(self, key: bytes) -> int:
        return self._pages[key].nbytes

    def last_use(self, key: bytes) -> float:
        return self._pages[key].last_use

    def children_count(self, key: bytes) -> int:
        return self._children.get(key, 0)

    def add(self, key: bytes, parent: bytes, nbytes: int, now: float) -> None:
        """Record a resident page; a key already present is replaced."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if key == parent:
            raise ValueError("a page cannot be its own parent")
        self.remove(key)
        self._pages[key] = _Page(parent, nbytes, now)
        self._total += nbytes
        if parent != NO_PARENT:
            self._children[parent] = self._children.get(parent, 0) + 1
        if self.children_count(key) == 0:
            self._push(key)

    def touch(self, key: bytes, now: float) -> bool:
        """Mark a use; False when not resident. Last use never moves backwards."""
        page = self._pages.get(key)
        if page is None:
            return False
        if now > page.last_use:
            page.last_use = now
            if self.children_count(key) == 0:
                self._push(key)
        return True

    def remove(self, key: bytes) -> bool:
        page = self._pages.pop(key, None)
        if page is None:
            return False
        self._total -= page.nbytes
        if page.parent != NO_PARENT:
            left = self._children[page.parent] - 1
            if left:
                self._children[page.parent] = left
            else:
                del self._children[page.parent]
                if page.parent in self._pages:
                    self._push(page.parent)
        return True

    def victims(self, budget_bytes: int, exclude: Collection[bytes] = ()) -> list[bytes]:
        """The pages to remove, in this order, to get total_bytes <= budget_bytes (fewer when
        only `exclude`d pages, or pages above them, are left). Removes nothing itself."""
        excess = self._total - budget_bytes
        if excess <= 0:
            return []
        out: list[bytes] = []
        popped: list[_Entry] = []  # live entries taken off the heap, put back at the end
        freed: list[_Entry] = []  # parents that become leaves once their children are victims
        taken: dict[bytes, int] = {}  # parent -> its children among the victims so far
        # Each step pops one entry off one of the two heaps, which only `freed` refills, at
        # most once per page.
        for _ in range(len(self._leaves) + len(self._pages) + 1):
            if excess <= 0:
                break
            self._drop_dead()
            if not self._leaves and not freed:
                break
            if not freed or (self._leaves and self._leaves[0] < freed[0]):
                entry = heapq.heappop(self._leaves)
                popped.append(entry)
            else:
                entry = heapq.heappop(freed)
            key = entry[2]
            if key in exclude:
                continue
            page = self._pages[key]
            out.append(key)
            excess -= page.nbytes
            parent = self._pages.get(page.parent)
            if parent is not None:
                taken[page.parent] = taken.get(page.parent, 0) + 1
                if taken[page.parent] == self._children[page.parent]:
                    heapq.heappush(freed, (parent.last_use, parent.seq, page.parent))
        for entry in popped:
            heapq.heappush(self._leaves, entry)
        return out

    def reconcile(self, found: Mapping[bytes, tuple[bytes, int, float]], started: float,
                  removed: Collection[bytes] = ()) -> None:
        """Merge a directory scan that began at `started`: `found` maps key -> (parent,
        nbytes, mtime). Pages the scan missed go unless used since it began (written while it
        ran); pages `removed` while it ran stay gone even if the scan saw them."""
        for key, (parent, nbytes, mtime) in found.items():
            if key in removed:
                continue
            if key in self._pages and self._pages[key].nbytes == nbytes:
                self.touch(key, mtime)  # another instance may have read it since
            else:
                self.add(key, parent, nbytes, mtime)
        for key in list(self._pages):
            if key not in found and self._pages[key].last_use < started:
                self.remove(key)

    def _live(self, entry: _Entry) -> bool:
        page = self._pages.get(entry[2])
        return page is not None and page.seq == entry[1] and entry[2] not in self._children

    def _drop_dead(self) -> None:
        while self._leaves and not self._live(self._leaves[0]):  # bounded by the heap's size
            heapq.heappop(self._leaves)

    def _push(self, key: bytes) -> None:
        page = self._pages[key]
        self._seq += 1
        page.seq = self._seq
        heapq.heappush(self._leaves, (page.last_use, page.seq, key))
        if len(self._leaves) > 2 * len(self._pages) + 64:
            self._leaves = [(p.last_use, p.seq, k) for k, p in self._pages.items()
                            if k not in self._children]
            heapq.heapify(self._leaves)
