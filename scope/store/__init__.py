"""The shared activation store: capture (writer), manifest, shards and the shuffled reader."""

from scope.store.manifest import Manifest, StoreConfig
from scope.store.reader import ActivationStore, Batch

__all__ = ["ActivationStore", "Batch", "Manifest", "StoreConfig", "capture_store"]


def __getattr__(name: str):
    # Capturing needs the model stack (TransformerLens, transformers: seconds to import); reading
    # a store does not, so the writer is imported only when asked for.
    if name == "capture_store":
        from scope.store.capture import capture_store

        return capture_store
    raise AttributeError(name)
