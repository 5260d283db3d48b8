"""What the dashboard pass yields per feature: its statistics, quantile intervals and examples.

The pass (stats.py) makes them, contexts.py fills their tokens, records.py turns them into JSON-ready
records; keeping the types here lets those modules import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def density(self) -> float:
        return self.count / self.rows if self.rows else 0.0

    def examples(self) -> list[Example]:
        """The top examples, then every interval's."""
        return [*self.top, *(e for iv in self.intervals for e in iv.examples)]
