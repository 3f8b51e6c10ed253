"""The keys the engine chooses among, and the ranking that keeps a choice among thousands of them cheap.

A plain scan that scores every key costs about 0.7 µs a key: 143 µs for a pool of 200 and 0.7 ms for
one of 1,000 whenever the current key cannot serve under health-based (benchmarks/bench_engine.py),
above the 50 µs selection may take at 200 keys. The ranking narrows the search to a handful of keys:
it leaves disabled keys out, sets cooling keys aside in deadline order, and ranks the rest by their
score at the moment it was built. Scores only rise with time, and never faster than a known rate, so
a ranking made at `built_at` still bounds every score later on: the engine stops reading it once no
later key could win. Keys at full health are ranked apart: their scores all rise alike (only the
idle bonus moves), so their order never changes and the first usable one is the best of them however
old the ranking.

The ranking only narrows the search. The engine still checks every key it takes from it against
`now`, so an old ranking costs time, never a wrong pick. Rosters are used one after the other (each
outcome makes the next one), so `with_updates` moves the rankings to the new roster and patches them
for the changed keys instead of copying them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator
from heapq import merge

from .models import Group, KeyRecord, Surface

# A key's score at a time, and whether its health is full then.
Ranker = Callable[[KeyRecord, float], tuple[float, bool]]
RERANK_AFTER = 300.0  # seconds: by then a ranking's bound has loosened by about one point
MAX_EXPIRED = 32
_LAST = float("inf")  # sorts after every position and deadline in the (value, position) pairs below


class Ranking:
    """Where to look for an eligible key of one surface (None: every surface), as of `built_at`.

    free     positions of the keys neither disabled nor cooling at built_at, ascending
    full     (-score at built_at, position) for those of them at full health: best first, lowest
             position on ties
    partial  the same for the others
    cooling  (cooldown_until, position) for the keys cooling at built_at, soonest first
    """

    __slots__ = ("_slots", "built_at", "cooling", "disabled", "free", "full", "partial", "rank", "surface", "total")

    def __init__(self, keys: list[KeyRecord], surface: Surface | None, rank: Ranker, now: float) -> None:
        self.surface = surface
        self.rank = rank
        self.built_at = now
        self.free: list[int] = []
        self.full: list[tuple[float, int]] = []
        self.partial: list[tuple[float, int]] = []
        self.cooling: list[tuple[float, int]] = []
        self.total = self.disabled = 0
        # Which list holds each ranked position, and its entry there, so an update finds it without a search.
        self._slots: dict[int, tuple[list[tuple[float, int]], tuple[float, int]]] = {}
        for pos, key in enumerate(keys):
            self._add(pos, key, ordered=False)
        for entries in (self.free, self.full, self.partial, self.cooling):
            entries.sort()

    def replace(self, pos: int, old: KeyRecord, new: KeyRecord) -> None:
        self._remove(pos, old)
        self._add(pos, new, ordered=True)

    def expired_count(self, now: float) -> int:
        """How many of the keys set aside as cooling have ended their cooldown by `now` (they lead the list)."""
        return bisect_right(self.cooling, (now, _LAST))

    def expired(self, now: float) -> list[int]:
        """Positions set aside as cooling whose cooldown has ended by `now`, ascending."""
        return sorted(pos for _, pos in self.cooling[: self.expired_count(now)])

    def in_order(self, now: float, start: int = 0) -> Iterator[int]:
        """Positions that may be eligible at `now`, in list order from `start`, wrapping."""
        free, late = self.free, self.expired(now)
        if late:
            i, j = bisect_left(free, start), bisect_left(late, start)
            yield from merge(free[i:], late[j:])
            yield from merge(free[:i], late[:j])
            return
        n = len(free)
        i = bisect_left(free, start)
        for step in range(n):  # no slices: callers usually stop at the first position
            yield free[(i + step) % n]

    def still_cooling(self, now: float) -> list[tuple[float, int]]:
        """(cooldown_until, position) of the keys set aside that still cool at `now`, soonest first."""
        return self.cooling[self.expired_count(now) :]

    def _member(self, key: KeyRecord) -> bool:
        return self.surface is None or key.surface is self.surface

    def _add(self, pos: int, key: KeyRecord, ordered: bool) -> None:
        if not self._member(key):
            return
        self.total += 1
        if key.disabled_reason is not None:
            self.disabled += 1
            return
        until = key.cooldown_until
        if until is not None and until > self.built_at:
            entries, entry = self.cooling, (until, pos)
        else:
            score, full = self.rank(key, self.built_at)
            entries, entry = (self.full if full else self.partial), (-score, pos)
            if ordered:
                insort(self.free, pos)
            else:
                self.free.append(pos)
        self._slots[pos] = (entries, entry)
        if ordered:
            insort(entries, entry)
        else:  # building: every list is sorted once at the end
            entries.append(entry)

    def _remove(self, pos: int, key: KeyRecord) -> None:
        if not self._member(key):
            return
        self.total -= 1
        slot = self._slots.pop(pos, None)
        if slot is None:  # it was disabled
            self.disabled -= 1
            return
        entries, entry = slot
        del entries[bisect_left(entries, entry)]
        if entries is not self.cooling:
            del self.free[bisect_left(self.free, pos)]


class Roster:
    """Keys in list order (the positions `list-keys` shows) with O(1) lookup by id."""

    __slots__ = ("_groups", "_pos", "_rankings", "keys")

    def __init__(self, keys: Iterable[KeyRecord]) -> None:
        self.keys: list[KeyRecord] = list(keys)
        self._pos: dict[int, int] = {k.id: i for i, k in enumerate(self.keys)}
        self._rankings: dict[tuple[Surface | None, Ranker], Ranking] = {}
        self._groups: dict[Group, list[int]] | None = None

    def in_group(self, group: Group) -> list[int]:
        """Positions of the keys that count against one account's caps, ascending (built on first use)."""
        if self._groups is None:
            groups: dict[Group, list[int]] = {}
            for pos, key in enumerate(self.keys):
                groups.setdefault(key.limit_group, []).append(pos)
            self._groups = groups
        return self._groups.get(group, [])

    def get(self, key_id: int | None) -> KeyRecord | None:
        if key_id is None:
            return None
        i = self._pos.get(key_id)
        return None if i is None else self.keys[i]

    def position_of(self, key_id: int) -> int | None:
        return self._pos.get(key_id)

    def ranking(self, surface: Surface | None, rank: Ranker, now: float) -> Ranking:
        """The ranking for one surface and ranking, built on first use. It is built again once its ranking
        is RERANK_AFTER seconds old (the bound it gives loosens with time) or many keys it set aside as
        cooling have come back: then a scan would read too many keys."""
        ranking = self._rankings.get((surface, rank))
        if ranking is None or abs(now - ranking.built_at) > RERANK_AFTER or ranking.expired_count(now) > MAX_EXPIRED:
            ranking = self._rankings[(surface, rank)] = Ranking(self.keys, surface, rank, now)
        return ranking

    def with_updates(self, records: Iterable[KeyRecord]) -> Roster:
        """A copy with these records replaced (ids not in the roster are ignored). The rankings move to
        the copy: this roster builds new ones if it is asked to select again."""
        out = Roster.__new__(Roster)
        out.keys = list(self.keys)
        out._pos = self._pos
        out._rankings, self._rankings = self._rankings, {}
        out._groups = self._groups
        for r in records:
            i = self._pos.get(r.id)
            if i is not None:
                old, out.keys[i] = out.keys[i], r
                for ranking in out._rankings.values():
                    ranking.replace(i, old, r)
                if old.account != r.account:  # an outcome named the key's account
                    out._groups = None
        return out

    def __len__(self) -> int:
        return len(self.keys)
