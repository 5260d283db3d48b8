"""The shared activation store: capture (writer), manifest, shards and the shuffled reader."""

from scope.store.capture import capture_store
from scope.store.manifest import Manifest, StoreConfig
from scope.store.reader import ActivationStore, Batch

__all__ = ["ActivationStore", "Batch", "Manifest", "StoreConfig", "capture_store"]
