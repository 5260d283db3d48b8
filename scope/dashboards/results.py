"""What the dashboard pass yields per feature: its statistics, quantile intervals and examples.

The pass (stats.py) makes them, contexts.py fills their tokens, records.py turns them into JSON-ready
records; keeping the types here lets those modules import them without importing each other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Example:
    """One row where a feature fired, with the feature's activations over the rows around it."""

    row: int  # place in the store view's order
    value: float
    offsets: list[int]  # context rows relative to ``row`` that lie in the same context window
    values: list[float]  # the feature's activation at each of them
    tokens: list[int]  # their token ids (filled by contexts.attach_tokens)
    doc_id: int = -1
    position: int = -1


@dataclass
class Interval:
    """A quantile interval of a feature's firing activations: [lo, hi), the last one closed."""

    lo: float
    hi: float
    contains: float  # exact share of the feature's firing rows in the interval
    examples: list[Example]


@dataclass
class DictionaryFiring:
    """On how many of the pass's rows every feature of the dictionary fired; one object shared by all features."""

    rows: int
    fired: list[int]  # per feature of the dictionary

    @functools.cached_property
    def log_density(self) -> dict[str, Any]:
        """A histogram of log10 firing density over the dictionary's features that fired, and how many never did."""
        fired = np.asarray(self.fired, dtype=np.float64)
        alive = fired[fired > 0] / max(self.rows, 1)
        lo = math.floor(math.log10(1 / max(self.rows, 1)))
        counts, edges = np.histogram(np.log10(alive), bins=DENSITY_BINS, range=(lo, 0))
        return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(),
                "dead": int((fired == 0).sum())}


DENSITY_BINS = 40


@dataclass
class FeatureStats:
    feature: int
    rows: int  # rows the pass read
    count: int  # rows where the feature fired (code > 0)
    max: float
    mean: float  # mean activation over the firing rows
    hist_edges: list[float]
    hist_counts: list[int]
    top: list[Example]
    intervals: list[Interval]
    correlated: list[tuple[int, float]]  # (feature, Pearson r), highest first
    dictionary: DictionaryFiring | None = None

    @property
    def density(self) -> float:
        return self.count / self.rows if self.rows else 0.0

    def examples(self) -> list[Example]:
        """The top examples, then every interval's."""
        return [*self.top, *(e for iv in self.intervals for e in iv.examples)]
