"""Context windows of a store's documents, rebuilt from its manifest, and the model it came from.

Methods that need the model's own forward pass over the text behind a store (the spliced-in LM
loss, attention patterns, p-RoPE) start here: the windows are cut exactly as at capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from scope.data import Window, doc_bucket, open_source, take_windows
from scope.errors import ScopeError
from scope.models import LoadedModel, load_model
from scope.store.manifest import SAELENS_PREFIX
from scope.store.reader import ActivationStore


def load_store_model(store: ActivationStore, device: str | torch.device | None = None) -> LoadedModel:
    """The model a store was captured from, in the dtype it was captured in."""
    cfg = store.manifest.config
    model = load_model(cfg.model, dtype=cfg.model_dtype, device=device)
    if cfg.model_revision and model.facts.revision and model.facts.revision != cfg.model_revision:
        warnings.warn(f"store {store.url!r} was captured from {cfg.model} revision {cfg.model_revision}, "
                      f"but the model loaded now is revision {model.facts.revision}", stacklevel=2)
    return model


def store_windows(store: ActivationStore, tokenizer: Any, max_tokens: int | None = None) -> list[Window]:
    """The context windows of the documents in a store view, rebuilt from the store's manifest.

    Windows are cut exactly as at capture (same source, document order and context length), so a
    held-out view gives windows of held-out documents only. At most ``max_tokens`` tokens (BOS
    included): the last window is cut short to fit.
    """
    cfg = store.manifest.config
    wanted = set(store.documents)
    if not wanted:
        raise ScopeError(f"store {store.url!r} has no documents in this view (an empty held-out split?); "
                         "raise the held-out fraction or capture more tokens")
    if cfg.source.spec.startswith(SAELENS_PREFIX):  # imported: no text to re-tokenise, but every token is stored
        return _windows_from_rows(store, wanted, max_tokens)
    source = open_source(cfg.source.spec, text_column=cfg.source.text_column, label_column=cfg.source.label_column)
    if source.fingerprint != cfg.source.fingerprint:
        raise ScopeError(f"text source {cfg.source.spec!r} has changed since store {store.url!r} was captured "
                         f"(fingerprint {source.fingerprint} != {cfg.source.fingerprint}); its documents cannot "
                         "be matched to the store's")
    docs = [d for d in source.documents(cfg.seed) if d.doc_id in wanted]
    return take_windows(tokenizer, docs, cfg.context, max_tokens)


def _windows_from_rows(store: ActivationStore, wanted: set[int], max_tokens: int | None) -> list[Window]:
    """One window per document from the store's own token ids (stores that kept every position)."""
    out: list[Window] = []
    total = 0
    for i, info in enumerate(store.manifest.shards):
        shard = store.shard(i)
        doc, tok, pos = (shard.read(c, 0, info.rows).numpy() for c in ("doc_id", "token_id", "position"))
        starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        for a, z in zip(starts, np.r_[starts[1:], len(doc)]):
            if int(doc[a]) not in wanted:
                continue
            tokens = tuple(int(t) for t in tok[a:z][np.argsort(pos[a:z], kind="stable")])
            room = len(tokens) if max_tokens is None else min(len(tokens), max_tokens - total)
            if room >= 2:
                out.append(Window(int(doc[a]), 0, tokens[:room]))
                total += room
            if max_tokens is not None and total >= max_tokens - 1:
                return out
    return out


def padded_batches(windows: Sequence[Window], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded token and attention-mask tensors, ``batch_size`` windows at a time."""
    for a in range(0, len(windows), batch_size):
        chunk = windows[a : a + batch_size]
        length = max(len(w.tokens) for w in chunk)
        toks = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for r, w in enumerate(chunk):
            toks[r, : len(w.tokens)] = torch.tensor(w.tokens)
            mask[r, : len(w.tokens)] = 1
        yield toks, mask


def split_windows(
    tokenizer: Any,
    store: ActivationStore | None = None,
    corpus: str | None = None,
    tokens: int = 8192,
    heldout_tokens: int = 0,
    context: int = 256,
    held_out: float = 0.1,
    seed: int = 0,
) -> tuple[list[Window], list[Window]]:
    """Windows to analyse and held-out windows (other documents) from a store's text or a corpus.

    With a store, its own documents, context and split are used (``context`` is ignored); with
    a corpus, documents are split by the same stable hash of their id.
    """
    if (store is None) == (corpus is None):
        raise ScopeError("pass exactly one of a store (--store DIR) or a corpus (--corpus NAME)")
    if tokens < 2 or heldout_tokens < 0:
        raise ScopeError(f"need at least 2 tokens to analyse and a non-negative held-out budget, got "
                         f"tokens={tokens}, heldout_tokens={heldout_tokens}")
    if store is not None:
        train, test = store.split(held_out, seed)
        main = store_windows(train, tokenizer, tokens)
        return main, store_windows(test, tokenizer, heldout_tokens) if heldout_tokens else []
    docs = open_source(corpus).documents(seed)
    test = [d for d in docs if doc_bucket(d.doc_id, seed) < held_out]
    train = [d for d in docs if doc_bucket(d.doc_id, seed) >= held_out]
    main = take_windows(tokenizer, train, context, tokens)
    return main, take_windows(tokenizer, test, context, heldout_tokens) if heldout_tokens else []
