"""Log-bucketed histograms: kept in rollups, added together, read back as percentiles.

A value ``v > 0`` falls in bin ``floor(log2(v) * BINS_PER_DOUBLING)``; a bin spans a ratio
of ``2 ** (1 / BINS_PER_DOUBLING)`` (about 9%), and a percentile is reported as its bin's
geometric midpoint. So a percentile read from a histogram is within ``RELATIVE_ERROR``
(about 4.4%) of the exact nearest-rank percentile of the same values: both fall in the
same bin. Values at or below ``FLOOR`` (including zero) share the lowest bin.

The database computes the same bins for raw rows (``store.edges``): SQLite with the C
library's ``log2``, as here, PostgreSQL as ``ln(v) / ln(2)``, which can be an ulp or two
off. ``GUARD`` is added before the floor on both sides, so that a value whose
``log2(v) * BINS_PER_DOUBLING`` is a whole number (a power of two, such as 128 ms)
falls in the same bin whichever way it was computed: only a value within about one part
in 10^10 below a bin's edge can move up a bin.

Histograms are sparse ``{bin: count}`` maps, so merging two is adding counts: hours merge
into days and rollups of any grouping merge into one, with no loss beyond the bin width.
They are stored as compact JSON text (``encode`` / ``decode``): an object of bin to count,
keys in no particular order (the writer re-encodes a few rollup rows on every commit, and
sorting the keys of a 75-bin histogram cost five times the encoding itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import orjson

BINS_PER_DOUBLING = 8
RELATIVE_ERROR = 2 ** (1 / (2 * BINS_PER_DOUBLING)) - 1
# Smallest value told apart from zero: a microsecond, a thousandth of a token per second.
FLOOR = 0.001
FLOOR_BIN = math.floor(math.log2(FLOOR) * BINS_PER_DOUBLING)
# Added before the floor, here and in SQL (see the module docstring).
GUARD = 1e-9

Histogram = dict[int, int]


def bin_of(value: float) -> int:
    if value <= FLOOR or math.isnan(value):
        return FLOOR_BIN
    return math.floor(math.log2(value) * BINS_PER_DOUBLING + GUARD)


def value_of(bin_: int) -> float:
    """The bin's geometric midpoint: what a percentile falling in it reports."""
    if bin_ <= FLOOR_BIN:
        return 0.0
    return float(2 ** ((bin_ + 0.5) / BINS_PER_DOUBLING))


def add(histogram: Histogram, value: float, count: int = 1) -> None:
    key = bin_of(value)
    histogram[key] = histogram.get(key, 0) + count


def merge(into: Histogram, other: Mapping[int, int]) -> Histogram:
    get = into.get  # reports merge ~4,000 histograms: the lookup once, not per bin
    for key, count in other.items():
        into[key] = get(key, 0) + count
    return into


def take(into: Histogram, other: Mapping[int, int]) -> Histogram:
    """Subtract ``other``'s counts from ``into``, dropping the bins that reach zero."""
    for key, count in other.items():
        left = into.get(key, 0) - count
        if left:
            into[key] = left
        else:
            into.pop(key, None)
    return into


def added(first: Histogram, second: Histogram) -> Histogram:
    """``first`` and ``second`` added up, as a new histogram unless one of them is empty
    (then the other one itself: the caller must not change the result in place)."""
    if not second:
        return first
    if not first:
        return second
    out = dict(first)
    for key, count in second.items():
        out[key] = out.get(key, 0) + count
    return out


def total(histogram: Mapping[int, int]) -> int:
    return sum(histogram.values())


def percentile(histogram: Mapping[int, int], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100), or None when empty."""
    n = total(histogram)
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for key in sorted(histogram):
        seen += histogram[key]
        if seen >= rank:
            return value_of(key)
    return value_of(max(histogram))  # unreachable: ranks never exceed n


def exact_percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank percentile of raw values: what ``percentile`` approximates."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def encode(histogram: Mapping[int, int]) -> str:
    # Integer keys written as JSON strings by orjson itself.
    return orjson.dumps(histogram, option=orjson.OPT_NON_STR_KEYS).decode()


# ``{"76":7,"-3":2}`` -> ``[76,7,-3,2]``: the stored object as a flat JSON array of
# integers, which orjson reads without a string per key (see ``decode``).
_AS_ARRAY = str.maketrans({'"': None, ":": ",", "{": "[", "}": "]"})


def decode(text: str | None) -> Histogram:
    """The histogram ``encode`` stored. Read as an array of bin, count, bin, count...:
    turning each key's string into an int cost twice the JSON parse itself, and reports
    decode three histograms per rollup row (``docs/benchmarks.md``). Only what ``encode``
    writes (integer keys and counts) is read this way."""
    if not text:
        return {}
    flat = orjson.loads(text.translate(_AS_ARRAY))
    return dict(zip(flat[::2], flat[1::2], strict=True))
