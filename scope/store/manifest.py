"""The store's ``manifest.json``: what was captured, from what, and which shards hold it."""

from __future__ import annotations

import json
import shlex
from math import prod

from pydantic import BaseModel, ConfigDict, ValidationError

from scope.errors import ScopeError, validation_summary
from scope.files import parse_json
from scope.store.fs import StoreFS

MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
FORMAT = "scope-activation-store"
VERSION = 1
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SAELENS_PREFIX = "saelens-cache:"  # the source spec of a store imported from a SAELens cache


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


def row_bytes(hooks: dict[str, list[int]], dtype: str) -> int:
    """Bytes of one row in a shard: every hook's activations, then token id (4), document id (8) and position (4)."""
    return sum(prod(s) for s in hooks.values()) * ITEMSIZE[dtype] + 16


def read_manifest(fs: StoreFS) -> Manifest | None:
    """The manifest of a store folder, or None when the folder holds none."""
    if not fs.exists(MANIFEST):
        return None
    data = parse_json(fs.read_bytes(MANIFEST), fs.url(MANIFEST), "it is not a scope store manifest")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ScopeError(f"{fs.url(MANIFEST)} is not a valid scope store manifest: {validation_summary(err)}") from None


def cache_command(manifest: Manifest, url: str) -> str | None:
    """The ``scope cache`` command that captures this store again (None when its settings have no flags)."""
    cfg = manifest.config
    args = ["scope", "cache", "--out", url, "--model", cfg.model, "--hooks", ",".join(cfg.hooks),
            "--corpus", cfg.source.spec, "--tokens", str(manifest.tokens_requested), "--context", str(cfg.context),
            "--dtype", cfg.dtype, "--model-dtype", cfg.model_dtype, "--seed", str(cfg.seed)]
    excluded = sorted(cfg.excluded)
    if excluded == ["eos", "pad"]:
        args.append("--include-bos")
    elif excluded != ["bos", "eos", "pad"]:
        return None
    # The fewest MiB that give the same shard_rows: the shard plan, and so the store, is the same.
    size = row_bytes(cfg.hooks, cfg.dtype)
    mb = max(1, -(-cfg.shard_rows * size // 2**20))
    if max(1, (mb << 20) // size) != cfg.shard_rows:
        return None
    args += ["--shard-mb", str(mb)]
    if cfg.source.text_column != "text":
        args += ["--text-column", cfg.source.text_column]
    if cfg.source.label_column not in ("label", None):
        args += ["--label-column", cfg.source.label_column]
    return shlex.join(args)


def recompute_advice(manifest: Manifest, url: str) -> str:
    """What to do about a missing or corrupted shard of this store: the command that recomputes it."""
    spec = manifest.config.source.spec
    if spec.startswith(SAELENS_PREFIX):
        return (f"this store was imported from the SAELens cache {spec[len(SAELENS_PREFIX):]}; import it again into "
                "a new folder with `scope store import-saelens`")
    command = cache_command(manifest, url)
    if command is None:
        return ("re-run the capture that made this store (the same out folder and the settings in its "
                "manifest.json) to recompute it")
    return f"re-run `{command}` to recompute it"


def write_manifest(fs: StoreFS, manifest: Manifest) -> None:
    fs.write_atomic(MANIFEST, manifest.model_dump_json(indent=2).encode())


def write_documents(fs: StoreFS, docs: dict[int, tuple[str | None, int]]) -> None:
    """Side table joining document ids to labels and row counts, one JSON object a line."""
    lines = (json.dumps({"doc_id": d, "label": lab, "rows": n}) for d, (lab, n) in sorted(docs.items()))
    fs.write_atomic(DOCUMENTS, ("\n".join(lines) + "\n").encode())


def read_documents(fs: StoreFS) -> dict[int, tuple[str | None, int]]:
    # Every capture and import writes the table before the manifest that marks the store complete, so a store
    # without one lost it; read as empty, its held-out split would be empty and the advice to capture more wrong.
    if not fs.exists(DOCUMENTS):
        raise ScopeError(f"{fs.url(DOCUMENTS)} is missing, so the store's documents and labels are unknown; copy "
                         "the whole store folder again, or capture the store again into a new folder")
    out = {}
    for i, line in enumerate(fs.read_bytes(DOCUMENTS).splitlines(), 1):
        if line.strip():
            rec = parse_json(line, fs.url(DOCUMENTS), "it is not a scope store's document table")
            try:
                doc = _DocumentRecord.model_validate(rec)
            except ValidationError as err:
                raise ScopeError(f"line {i} of {fs.url(DOCUMENTS)} is not a document record "
                                 f'{{"doc_id": ..., "label": ..., "rows": ...}}: {validation_summary(err)}') from None
            out[doc.doc_id] = (doc.label, doc.rows)
    return out


class _DocumentRecord(BaseModel):
    doc_id: int
    label: str | None
    rows: int
