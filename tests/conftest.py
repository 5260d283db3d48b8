"""Shared fixtures: the real bundled Gemma 3 270M (loaded once) and a small real store."""

from __future__ import annotations

import pytest

from scope.data import open_source
from scope.models import load_model
from scope.store import ActivationStore, capture_store


@pytest.fixture(scope="session")
def gemma():
    """The bundled Gemma 3 270M in float32 on the CPU (converted once into $SCOPE_CACHE)."""
    return load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def small_store(gemma, tmp_path_factory) -> ActivationStore:
    """3,000 rows of BBC text at two hooks, in shards of ~100 rows (many shards, fast to make)."""
    out = tmp_path_factory.mktemp("store") / "bbc"
    capture_store(gemma, open_source("bbc"), ["blocks.6.hook_resid_post", "blocks.2.attn.hook_k"], str(out),
                  tokens=3000, context=64, shard_bytes=400 * 1024, progress=False)
    return ActivationStore(str(out))
