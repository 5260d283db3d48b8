"""A config's activation store: captured first when it is missing and the config's ``capture:`` says how."""

from __future__ import annotations

from scope.errors import ScopeError
from scope.store.fs import StoreFS
from scope.store.manifest import read_manifest
from scope.training.config import TrainConfig


def ensure_store(cfg: TrainConfig) -> None:
    """Capture the config's store first when it is missing and the config says how."""
    existing = read_manifest(StoreFS(cfg.store))
    if existing is not None and existing.complete:
        return
    if cfg.capture is None:
        raise ScopeError(f"store {cfg.store!r} does not exist (or is incomplete); create it with `scope cache "
                         "--out ...`, or add a `capture:` section to the config")
    # The model stack takes seconds to import; a store that exists never needs it.
    from scope.data import open_source
    from scope.models import load_model
    from scope.store.capture import capture_store

    c = cfg.capture
    model = load_model(c.model, dtype=c.model_dtype, device=cfg.trainer.device)
    capture_store(model, open_source(c.corpus), c.hooks, cfg.store, c.tokens, context=c.context, dtype=c.dtype,
                  batch_size=c.batch_size)
