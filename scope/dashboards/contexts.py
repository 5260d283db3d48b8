"""Context tokens of dashboard examples, re-read from the store's token ids after the pass.

An example's context is the rows around it that belong to the same context window as it was
captured: same document, and positions that differ by exactly the row offset (a window's rows
are consecutive in the store; the next window of a document restarts its positions).
"""

from __future__ import annotations

import numpy as np

from scope.dashboards.results import FeatureStats
from scope.store.reader import ActivationStore


def attach_tokens(store: ActivationStore, stats: list[FeatureStats], rows: int) -> None:
    """Fill every example's token ids, document and position, and drop context rows outside its window."""
    examples = [e for s in stats for e in s.examples()]
    if not examples:
        return
    offsets = np.asarray(examples[0].offsets, dtype=np.int64)
    centre = np.fromiter((e.row for e in examples), np.int64, len(examples))
    where = centre[:, None] + offsets[None, :]
    inside = (where >= 0) & (where < rows)
    meta = store.take(np.where(inside, where, centre[:, None]).reshape(-1), hooks=[])
    tok, doc, pos = (t.numpy().reshape(where.shape) for t in (meta.token_id, meta.doc_id, meta.position))
    mid = int(np.flatnonzero(offsets == 0)[0])
    same = inside & (doc == doc[:, mid : mid + 1]) & (pos.astype(np.int64) - pos[:, mid : mid + 1] == offsets)
    for e, ok, t, d, p in zip(examples, same, tok, doc[:, mid], pos[:, mid]):
        e.offsets = offsets[ok].tolist()
        e.values = [v for v, k in zip(e.values, ok) if k]
        e.tokens = t[ok].tolist()
        e.doc_id, e.position = int(d), int(p)

