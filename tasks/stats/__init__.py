"""Typed run statistics (counts, maxima, ratios, tallies, histograms, examples) that know how to merge themselves.

A stage returns a `Stats`: named values, each of a kind that merges itself (a count adds, a maximum keeps the
largest, a ratio adds its numerator and denominator, a tally adds per key, a histogram adds per bin, an
examples list keeps the first k by its sort key). Every merge is associative and commutative, so a shard's or
a run's statistics do not depend on the order in which batches finish or on how parts are grouped.

Two JSON forms: `to_json()` is the view people read (a ratio as its value, a tally cut to its top entries);
`dump()` is lossless and typed (`{name: [kind, payload]}`), for the ledger and the shard files that later
merges read back with `Stats.load`. The audit of a run (funnel, histograms, eta sweep, unmatched nouns, ...)
is built from merged stage statistics by tasks/audit/summary.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from tasks.stats.kinds import (
    KINDS,
    NOUN_EXAMPLES,
    SCORE_EDGES,
    Count,
    Examples,
    Group,
    Histogram,
    Label,
    Max,
    Ratio,
    Seconds,
    Stat,
    Tally,
    dump_stat,
    load_stat,
)

__all__ = [
    "ETAS", "KINDS", "NOUN_EXAMPLES", "SCORES", "SCORE_EDGES", "Count", "Examples", "Group", "Histogram", "Label",
    "Max", "Ratio", "Seconds", "Stat", "Stats", "Tally",
]  # fmt: skip

#: eta values of the sweep: 0.05, 0.10, ..., 0.95
ETAS: tuple[float, ...] = tuple(round(k / 20, 2) for k in range(1, 20))
#: the scores histogrammed over tagged rows (accepted + rejected)
SCORES: tuple[str, ...] = ("p_subject", "p_object", "p_relation", "confidence")


# -- the container -----------------------------------------------------------------------------------------


class Stats(Mapping):
    """Named statistics of one stage (or shard, or run). Reading `stats[name]` gives the value as the JSON view
    shows it; `stat(name)` gives the typed statistic. Iteration and equality cover the visible names."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Stat] | None = None, **kw: Stat):
        self._items: dict[str, Stat] = {}
        if isinstance(items, Stats):  # a copy: every statistic, hidden ones too (a Mapping shows the view)
            items = items._items
        for name, s in {**(items or {}), **kw}.items():
            self.put(name, s)

    def put(self, name: str, s: Stat) -> Stats:
        """Set (or replace) one statistic; returns self."""
        if not isinstance(s, Stat):
            raise ValueError(f"statistic {name!r} is a {type(s).__name__}, not a typed Stat")
        self._items[name] = s
        return self

    def stat(self, name: str, default: Stat | None = None) -> Stat | None:
        return self._items.get(name, default)

    def names(self) -> list[str]:
        """Every name, hidden ones included."""
        return list(self._items)

    def __getitem__(self, name: str):
        return self._items[name].view()

    def __iter__(self) -> Iterator[str]:
        return (k for k, s in self._items.items() if not s.hidden)

    def __len__(self) -> int:
        return sum(1 for s in self._items.values() if not s.hidden)

    def count(self, name: str) -> int:
        """A count's (or maximum's) value; 0 when the statistic is absent."""
        st = self.stat(name)
        return st.view() if st is not None else 0

    def tally(self, name: str) -> dict:
        """A tally's counts by key; {} when the statistic is absent."""
        st = self.stat(name)
        return dict(st.counts) if isinstance(st, Tally) else {}

    def __contains__(self, name) -> bool:
        s = self._items.get(name)
        return s is not None and not s.hidden

    def __repr__(self) -> str:
        return f"Stats({self._items!r})"

    def merge(self, other: Stats) -> Stats:
        """The statistics of both parts: same-named statistics merged by their kind, the others kept."""
        out = Stats(self)
        for name, s in other._items.items():
            mine = out._items.get(name)
            if mine is None:
                out._items[name] = s
            else:
                try:
                    out._items[name] = mine.merge(s)
                except ValueError as e:
                    raise ValueError(f"statistic {name!r}: {e}") from None
        return out

    @staticmethod
    def merge_all(parts: Iterable[Stats]) -> Stats:
        out = Stats()
        for p in parts:
            out = out.merge(p)
        return out

    def to_json(self) -> dict:
        """The view: visible statistics as plain JSON values."""
        return {k: s.view() for k, s in self._items.items() if not s.hidden}

    def dump(self) -> dict:
        """Lossless, typed JSON: {name: [kind, payload, hidden]}; `Stats.load` reads it back."""
        return {k: dump_stat(s) for k, s in self._items.items()}

    @classmethod
    def load(cls, d: Mapping, what: str = "stats") -> Stats:
        if not isinstance(d, Mapping):
            raise ValueError(f"{what} is a {type(d).__name__}, not a JSON object of typed statistics")
        return cls({k: load_stat(v, f"{what}: statistic {k!r}") for k, v in d.items()})
