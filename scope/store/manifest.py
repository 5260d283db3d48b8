"""The store's ``manifest.json``: what was captured, from what, and which shards hold it."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from scope.errors import ScopeError
from scope.store.fs import StoreFS

MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
FORMAT = "scope-activation-store"
VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceInfo(_Strict):
    spec: str
    fingerprint: str
    label_name: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"


class StoreConfig(_Strict):
    """Everything that decides a store's content; a capture into an existing store must match it."""

    model: str
    model_revision: str | None
    model_dtype: str
    hooks: dict[str, list[int]]  # hook name -> per-row shape
    dtype: str
    source: SourceInfo
    seed: int
    context: int
    excluded: list[str]  # token kinds left out of the store: "bos", "eos", "pad"
    shard_rows: int

    def differences(self, other: "StoreConfig") -> list[str]:
        """Human-readable ``key: ours != theirs`` lines for every field that differs."""
        a, b = self.model_dump(), other.model_dump()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


class ShardInfo(_Strict):
    name: str
    rows: int
    bytes: int
    crc32: str
    first_window: int
    n_windows: int
    rank: int = 0


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    version: int = VERSION
    config: StoreConfig
    tokens_requested: int
    complete: bool = False
    shards: list[ShardInfo] = []
    world_size: int = 1
    scope_version: str = ""

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def read_manifest(fs: StoreFS) -> Manifest | None:
    """The manifest of a store folder, or None when the folder holds none."""
    if not fs.exists(MANIFEST):
        return None
    try:
        return Manifest.model_validate_json(fs.read_bytes(MANIFEST))
    except ValueError as err:
        raise ScopeError(f"{fs.url(MANIFEST)} is not a valid scope store manifest: {str(err).splitlines()[0]}") from err


def write_manifest(fs: StoreFS, manifest: Manifest) -> None:
    fs.write_atomic(MANIFEST, manifest.model_dump_json(indent=2).encode())


def write_documents(fs: StoreFS, docs: dict[int, tuple[str | None, int]]) -> None:
    """Side table joining document ids to labels and row counts, one JSON object a line."""
    lines = (json.dumps({"doc_id": d, "label": lab, "rows": n}) for d, (lab, n) in sorted(docs.items()))
    fs.write_atomic(DOCUMENTS, ("\n".join(lines) + "\n").encode())


def read_documents(fs: StoreFS) -> dict[int, tuple[str | None, int]]:
    if not fs.exists(DOCUMENTS):
        return {}
    out = {}
    for line in fs.read_bytes(DOCUMENTS).decode().splitlines():
        if line:
            rec = json.loads(line)
            out[rec["doc_id"]] = (rec["label"], rec["rows"])
    return out
