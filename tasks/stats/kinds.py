"""The kinds of statistic, each merging itself: count, maximum, seconds, label, ratio, tally, histogram,
examples, group (tasks/stats/__init__.py gathers them into a Stats)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: bin edges of the score histograms: 20 bins of 0.05 over [0, 1], the last bin closed on the right
SCORE_EDGES: tuple[float, ...] = tuple(round(k / 20, 2) for k in range(21))
#: example captions kept per unmatched noun
NOUN_EXAMPLES = 3


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be an int, got {v!r}")
    return v


# -- the kinds ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """One statistic. `hidden`: merged and dumped, but left out of the stage's JSON view (bulky audit data)."""

    kind: ClassVar[str] = ""

    def merge(self, other: Stat) -> Stat:
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {self.kind} with a {other.kind}")
        return self._merge(other)

    def _merge(self, other):  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def view(self) -> Any:
        raise NotImplementedError

    def payload(self) -> Any:
        raise NotImplementedError

    @classmethod
    def from_payload(cls, p: Any, hidden: bool) -> Stat:
        raise NotImplementedError


@dataclass(frozen=True)
class Count(Stat):
    """A count: merged by adding."""

    n: int = 0
    hidden: bool = False
    kind: ClassVar[str] = "count"

    def __post_init__(self):
        _int(self.n, "Count")

    def _merge(self, other):
        return Count(self.n + other.n, self.hidden)

    def view(self):
        return self.n

    def payload(self):
        return self.n

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(p, hidden)


@dataclass(frozen=True)
class Max(Stat):
    """A value of which the largest is kept (e.g. a micro-batch size, processes used)."""

    value: int | float = 0
    hidden: bool = False
    kind: ClassVar[str] = "max"

    def _merge(self, other):
        return Max(max(self.value, other.value), self.hidden)

    def view(self):
        return self.value

    def payload(self):
        return self.value

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(p, hidden)


@dataclass(frozen=True)
class Seconds(Stat):
    """Time spent, summed; kept as whole microseconds so that sums are exact in any order."""

    us: int = 0
    hidden: bool = False
    kind: ClassVar[str] = "seconds"

    def __post_init__(self):
        _int(self.us, "Seconds (microseconds)")

    @classmethod
    def of(cls, seconds: float, hidden: bool = False) -> Seconds:
        return cls(round(seconds * 1e6), hidden)

    def _merge(self, other):
        return Seconds(self.us + other.us, self.hidden)

    def view(self):
        return round(self.us / 1e6, 3)

    def payload(self):
        return self.us

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(p, hidden)


@dataclass(frozen=True)
class Label(Stat):
    """A setting or version the parts report (matcher mode, parser versions): the distinct values seen.

    The view is the value when every part agrees, else the sorted list of distinct values."""

    values: frozenset[str] = frozenset()  # JSON texts of the values
    hidden: bool = False
    kind: ClassVar[str] = "label"

    @classmethod
    def of(cls, value, hidden: bool = False) -> Label:
        return cls(frozenset({json.dumps(value, sort_keys=True)}), hidden)

    def _merge(self, other):
        return Label(self.values | other.values, self.hidden)

    def view(self):
        vals = [json.loads(v) for v in sorted(self.values)]
        return vals[0] if len(vals) == 1 else vals

    def payload(self):
        return sorted(self.values)

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(frozenset(p), hidden)


@dataclass(frozen=True)
class Ratio(Stat):
    """A ratio of two counts (e.g. relations per parsed caption): numerator and denominator add up, the value
    is recomputed from them, rounded to `digits` (0.0 when the denominator is 0)."""

    num: int = 0
    den: int = 0
    digits: int = 4
    hidden: bool = False
    kind: ClassVar[str] = "ratio"

    def __post_init__(self):
        _int(self.num, "Ratio numerator")
        _int(self.den, "Ratio denominator")

    def _merge(self, other):
        if other.digits != self.digits:
            raise ValueError(f"cannot merge ratios rounded to {self.digits} and {other.digits} digits")
        return Ratio(self.num + other.num, self.den + other.den, self.digits, self.hidden)

    def view(self):
        return round(self.num / self.den, self.digits) if self.den else 0.0

    def payload(self):
        return [self.num, self.den, self.digits]

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(p[0], p[1], p[2], hidden)


Key = str | tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Tally(Stat):
    """Counts per key (a string, or a tuple of strings such as a class pair); merged by adding per key.

    Every key is kept (so merges are exact); the view is sorted by count (descending) then key and cut to
    `top` entries when set. form "dict": {key: n} (tuple keys joined by " | "); "pairs": [[key..., n], ...];
    "keys": {key: n} sorted by key as a number where it is one (a distribution such as N_Unique)."""

    counts: Mapping[Key, int] = field(default_factory=dict)
    top: int | None = None
    form: str = "dict"
    hidden: bool = False
    kind: ClassVar[str] = "tally"

    def __post_init__(self):
        if self.form not in ("dict", "pairs", "keys"):
            raise ValueError(f"Tally form must be 'dict', 'pairs' or 'keys', got {self.form!r}")
        for k, v in self.counts.items():
            _int(v, f"Tally count of {k!r}")

    @classmethod
    def of(cls, keys: Iterable[Key], **kw) -> Tally:
        counts: dict[Key, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return cls(counts, **kw)

    def __eq__(self, other):
        return (
            isinstance(other, Tally)
            and dict(self.counts) == dict(other.counts)
            and (self.top, self.form, self.hidden) == (other.top, other.form, other.hidden)
        )

    def _merge(self, other):
        if (other.top, other.form) != (self.top, self.form):
            raise ValueError(
                f"cannot merge tallies shown as ({self.top}, {self.form}) and ({other.top}, {other.form})"
            )
        out = dict(self.counts)
        for k, v in other.counts.items():
            out[k] = out.get(k, 0) + v
        return Tally(out, self.top, self.form, self.hidden)

    def most_common(self) -> list[tuple[Key, int]]:
        """Every (key, count), count descending, then key."""
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def view(self):
        if self.form == "keys":

            def num(k):
                try:
                    return (0, float(k), k)
                except (TypeError, ValueError):
                    return (1, 0.0, k)

            items = sorted(self.counts.items(), key=lambda kv: num(kv[0]))
        else:
            items = self.most_common()
        if self.top is not None:
            items = items[: self.top]
        if self.form == "pairs":
            return [[*(k if isinstance(k, tuple) else (k,)), v] for k, v in items]
        return {(" | ".join(k) if isinstance(k, tuple) else k): v for k, v in items}

    def payload(self):
        items = sorted(self.counts.items(), key=lambda kv: kv[0])
        return {
            "top": self.top,
            "form": self.form,
            "items": [[list(k) if isinstance(k, tuple) else k, v] for k, v in items],
        }

    @classmethod
    def from_payload(cls, p, hidden):
        counts = {(tuple(k) if isinstance(k, list) else k): v for k, v in p["items"]}
        return cls(counts, p["top"], p["form"], hidden)


@dataclass(frozen=True)
class Histogram(Stat):
    """Counts of values in fixed bins [e_i, e_i+1) (the last bin closed: [e_n-1, e_n]); NaN and values outside
    the edges are counted apart. Merged by adding per bin; parts must share their edges."""

    edges: tuple[float, ...] = SCORE_EDGES
    counts: tuple[int, ...] = ()
    nan: int = 0
    outside: int = 0
    hidden: bool = False
    kind: ClassVar[str] = "histogram"

    def __post_init__(self):
        if len(self.edges) < 2 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"histogram edges must be at least 2 increasing values, got {self.edges}")
        if not self.counts:
            object.__setattr__(self, "counts", (0,) * (len(self.edges) - 1))
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"histogram has {len(self.edges)} edges but {len(self.counts)} counts")

    @classmethod
    def of(cls, values: Iterable[float], edges: tuple[float, ...] = SCORE_EDGES, hidden=False) -> Histogram:
        counts = [0] * (len(edges) - 1)
        nan = outside = 0
        for v in values:
            if v != v:
                nan += 1
            elif v < edges[0] or v > edges[-1]:
                outside += 1
            else:
                counts[min(bisect.bisect_right(edges, v) - 1, len(counts) - 1)] += 1
        return cls(tuple(edges), tuple(counts), nan, outside, hidden)

    def _merge(self, other):
        if other.edges != self.edges:
            raise ValueError(f"cannot merge histograms with edges {self.edges} and {other.edges}")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts))
        return Histogram(self.edges, counts, self.nan + other.nan, self.outside + other.outside, self.hidden)

    def view(self):
        return {
            "edges": list(self.edges),
            "counts": list(self.counts),
            "nan": self.nan,
            "outside": self.outside,
        }

    def payload(self):
        return self.view()

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(tuple(p["edges"]), tuple(p["counts"]), p["nan"], p["outside"], hidden)


@dataclass(frozen=True)
class Examples(Stat):
    """At most k example values, the first k by their sort key (e.g. (image_id, caption_id)), not by arrival:
    merging keeps the k smallest (key, value) of the union, so the result does not depend on batch order."""

    k: int = NOUN_EXAMPLES
    items: tuple[tuple[tuple, str], ...] = ()
    hidden: bool = False
    kind: ClassVar[str] = "examples"

    @classmethod
    def of(cls, items: Iterable[tuple[tuple, str]], k: int = NOUN_EXAMPLES, hidden=False) -> Examples:
        return cls(k, tuple(sorted({(tuple(key), v) for key, v in items}))[:k], hidden)

    def _merge(self, other):
        if other.k != self.k:
            raise ValueError(f"cannot merge example lists of {self.k} and {other.k}")
        return Examples.of(self.items + other.items, self.k, self.hidden)

    def view(self):
        return [v for _, v in self.items]

    def payload(self):
        return {"k": self.k, "items": [[list(key), v] for key, v in self.items]}

    @classmethod
    def from_payload(cls, p, hidden):
        return cls(p["k"], tuple((tuple(key), v) for key, v in p["items"]), hidden)


@dataclass(frozen=True, eq=False)
class Group(Stat):
    """Statistics per key (e.g. examples per unmatched noun): merged key by key."""

    items: Mapping[str, Stat] = field(default_factory=dict)
    hidden: bool = False
    kind: ClassVar[str] = "group"

    def __eq__(self, other):
        return (
            isinstance(other, Group) and dict(self.items) == dict(other.items) and self.hidden == other.hidden
        )

    def _merge(self, other):
        out = dict(self.items)
        for k, v in other.items.items():
            out[k] = out[k].merge(v) if k in out else v
        return Group(out, self.hidden)

    def view(self):
        return {k: self.items[k].view() for k in sorted(self.items)}

    def payload(self):
        return {k: dump_stat(self.items[k]) for k in sorted(self.items)}

    @classmethod
    def from_payload(cls, p, hidden):
        return cls({k: load_stat(v, f"group entry {k!r}") for k, v in p.items()}, hidden)


KINDS: dict[str, type[Stat]] = {
    c.kind: c for c in (Count, Max, Seconds, Label, Ratio, Tally, Histogram, Examples, Group)
}


def dump_stat(s: Stat) -> list:
    return [s.kind, s.payload(), s.hidden]


def load_stat(entry, what: str) -> Stat:
    if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in KINDS):
        raise ValueError(
            f"{what} is {json.dumps(entry)[:80]}, not a typed statistic [kind, payload, hidden] "
            f"(kinds: {sorted(KINDS)}); was it written by an older reltag?"
        )
    return KINDS[entry[0]].from_payload(entry[1], bool(entry[2]))
