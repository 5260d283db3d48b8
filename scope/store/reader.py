"""Reading a store: shuffled batches in bounded memory, document splits and label filters."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from scope.data import doc_bucket
from scope.errors import ScopeError
from scope.store.fs import StoreFS
from scope.store.manifest import Manifest, read_documents, read_manifest, recompute_advice
from scope.store.shards import META_COLUMNS, ShardReader, as_tensor, missing_shards

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Batch:
    """A batch of rows: activations per hook plus where each row came from."""

    acts: dict[str, torch.Tensor]
    token_id: torch.Tensor
    doc_id: torch.Tensor
    position: torch.Tensor


@dataclass(frozen=True)
class _Chunk:
    shard: int
    start: int
    stop: int


class ActivationStore:
    """A captured store (a folder or fsspec URL), optionally restricted to some documents."""

    def __init__(self, url: str, docs: frozenset[int] | None = None, verify: bool = True):
        self.fs = StoreFS(url)
        manifest = read_manifest(self.fs)
        if manifest is None:
            raise ScopeError(f"{url!r} is not a scope activation store (no manifest.json); create one with `scope cache`")
        if not manifest.complete:
            raise ScopeError(f"store {url!r} is incomplete (its capture was interrupted); re-run the same "
                             "`scope cache` command to finish it")
        self.manifest: Manifest = manifest
        self.url, self.docs, self.verify = str(url), docs, verify
        self.advice = recompute_advice(manifest, self.url)
        self._documents: dict[int, tuple[str | None, int]] | None = None
        self._readers: dict[int, ShardReader] = {}
        if verify:  # one listing: a deleted shard fails here, not hours into a training run
            present = set(self.fs.listdir("shards"))
            gone = [s for s in manifest.shards if Path(s.name).name not in present]
            if gone:
                raise ScopeError(missing_shards(gone, self.fs, self.advice))

    # --- what the store holds -------------------------------------------------------------
    @property
    def hooks(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest.config.hooks.items()}

    def width(self, hook: str) -> int:
        """Width of one row of ``hook`` (product of its per-row shape)."""
        shape = self.hooks[self.check_hook(hook)]
        return int(torch.tensor(shape).prod())

    @property
    def documents(self) -> dict[int, tuple[str | None, int]]:
        """doc_id -> (label, rows in the store), for the documents this view covers."""
        if self._documents is None:
            docs = read_documents(self.fs)
            self._documents = docs if self.docs is None else {d: v for d, v in docs.items() if d in self.docs}
        return self._documents

    @property
    def labels(self) -> dict[int, str | None]:
        return {d: lab for d, (lab, _) in self.documents.items()}

    def __len__(self) -> int:
        return self.manifest.rows if self.docs is None else sum(n for _, n in self.documents.values())

    def check_hook(self, hook: str) -> str:
        if hook not in self.manifest.config.hooks:
            raise ScopeError(f"store {self.url!r} has no hook {hook!r}; it holds {sorted(self.manifest.config.hooks)}")
        return hook

    def info(self) -> dict:
        """A JSON-ready summary: rows, hooks and widths, dtype, source, model."""
        cfg = self.manifest.config
        labels: dict[str, int] = {}
        for lab, _ in self.documents.values():
            labels[str(lab)] = labels.get(str(lab), 0) + 1
        return {
            "url": self.url, "rows": len(self), "documents": len(self.documents),
            "hooks": {h: {"shape": s, "width": self.width(h)} for h, s in cfg.hooks.items()},
            "dtype": cfg.dtype, "model": cfg.model, "model_revision": cfg.model_revision,
            "model_dtype": cfg.model_dtype, "corpus": cfg.source.spec, "corpus_fingerprint": cfg.source.fingerprint,
            "label_name": cfg.source.label_name, "labels": labels, "context": cfg.context,
            "excluded": cfg.excluded, "shards": len(self.manifest.shards),
            "bytes": sum(s.bytes for s in self.manifest.shards),
        }

    # --- views ---------------------------------------------------------------------------
    def select(self, docs: Iterable[int]) -> "ActivationStore":
        """The same store restricted to the given document ids."""
        view = object.__new__(ActivationStore)
        view.__dict__.update(self.__dict__)
        keep = frozenset(int(d) for d in docs)
        view.docs = keep if self.docs is None else keep & self.docs
        view._documents = None
        return view

    def where(self, labels: str | Iterable[str]) -> "ActivationStore":
        """Only the documents whose label is one of ``labels`` (exact, or glob patterns such as ``bbc:*``)."""
        patterns = [labels] if isinstance(labels, str) else list(labels)
        known = {lab for lab, _ in self.documents.values() if lab is not None}
        wanted: set[str] = set()
        for pat in patterns:
            hits = set(fnmatch.filter(known, pat)) if any(c in pat for c in "*?[") else {pat} & known
            if not hits:
                raise ScopeError(f"label {pat!r} matches no document of store {self.url!r}; it has labels "
                                 f"{sorted(known)}")
            wanted |= hits
        return self.select(d for d, (lab, _) in self.documents.items() if lab in wanted)

    def split(self, held_out: float = 0.1, seed: int = 0) -> tuple["ActivationStore", "ActivationStore"]:
        """(train, held-out) views, split by document so no document is in both."""
        if not 0 < held_out < 1:
            raise ScopeError(f"held_out must be a fraction in (0, 1), got {held_out}")
        test = [d for d in self.documents if doc_bucket(d, seed) < held_out]
        test_set = set(test)
        return self.select(d for d in self.documents if d not in test_set), self.select(test)

    # --- reading -------------------------------------------------------------------------
    def shard(self, index: int) -> ShardReader:
        if index not in self._readers:
            self._readers[index] = ShardReader(self.fs, self.manifest.shards[index], self.verify, self.advice)
        return self._readers[index]

    def verify_all(self) -> None:
        """Check every shard's checksum; the error names the first corrupted shard."""
        for info in self.manifest.shards:
            ShardReader(self.fs, info, True, self.advice)

    def _chunks(self, chunk_rows: int) -> list[_Chunk]:
        return [_Chunk(i, a, min(a + chunk_rows, s.rows))
                for i, s in enumerate(self.manifest.shards) for a in range(0, s.rows, chunk_rows)]

    def _read(self, chunk: _Chunk, hooks: list[str]) -> Batch:
        reader = self.shard(chunk.shard)
        meta = {c: reader.read(c, chunk.start, chunk.stop) for c in META_COLUMNS}
        acts = {h: reader.read(h, chunk.start, chunk.stop) for h in hooks}
        batch = Batch(acts, meta["token_id"], meta["doc_id"], meta["position"])
        if self.docs is not None:
            keep = torch.isin(batch.doc_id, torch.tensor(sorted(self.docs), dtype=batch.doc_id.dtype))
            batch = _take(batch, keep)
        return batch

    def rows(
        self,
        hooks: str | list[str] | None = None,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_rows: int = 1 << 18,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        drop_last: bool = False,
        epochs: int = 1,
    ) -> Iterator[Batch]:
        """Batches of rows with their token/document/position, shuffled with a bounded buffer.

        Random chunks (an eighth of the buffer each) of randomly ordered shards enter a mixing
        buffer, which hands out a shuffled half and keeps the rest (as SAELens's mixing buffer
        does). For local stores the buffer holds only (shard, row) indices and every batch is
        gathered once from the memory-mapped shards; remote stores mix the rows themselves, in
        about ``2 * buffer_rows`` rows of memory. Rows within a batch come in store order.
        """
        hooks = self._checked_hooks(hooks)
        if batch_size <= 0 or buffer_rows < batch_size:
            raise ScopeError(f"need 0 < batch_size <= buffer_rows, got batch_size={batch_size}, buffer_rows={buffer_rows}")
        out_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if isinstance(dtype, str) and dtype not in _DTYPES:
            raise ScopeError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            if self.fs.is_local:
                batches = self._mixed_from_maps(hooks, batch_size, buffer_rows, gen, drop_last, shuffle)
            else:
                batches = self._mixed_in_memory(hooks, batch_size, buffer_rows, gen, drop_last, shuffle)
            for b in batches:
                yield _to(b, out_dtype, device)

    def _mixed_from_maps(self, hooks: list[str], batch_size: int, buffer_rows: int, gen: torch.Generator,
                         drop_last: bool, shuffle: bool = True) -> Iterator[Batch]:
        """Local stores: the buffer mixes (shard, row) indices only; each batch is gathered once from the maps."""
        chunk_rows = max(batch_size, buffer_rows // 8)
        chunks = self._chunks(chunk_rows)
        if shuffle:
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]
        names = [*hooks, *META_COLUMNS]
        pool = np.empty((0, 2), np.int64)
        keep_docs = None if self.docs is None else np.fromiter(self.docs, np.int64)

        def emit(n_out: int) -> Iterator[Batch]:
            nonlocal pool
            if shuffle:
                pool = pool[torch.randperm(len(pool), generator=gen).numpy()]
            for a in range(0, n_out, batch_size):
                yield self._gather(pool[a : a + batch_size], names)
            pool = pool[n_out:]

        for chunk in chunks:
            rows = np.arange(chunk.start, chunk.stop)
            if self.docs is not None:
                doc = self.shard(chunk.shard).column("doc_id")[chunk.start : chunk.stop]
                rows = rows[np.isin(doc, keep_docs)]
            pool = np.concatenate([pool, np.stack([np.full(len(rows), chunk.shard), rows], 1)])
            if len(pool) >= (buffer_rows if shuffle else batch_size):
                yield from emit((len(pool) - (buffer_rows // 2 if shuffle else 0)) // batch_size * batch_size)
        yield from emit(len(pool) // batch_size * batch_size if drop_last else len(pool))

    def _gather(self, sel: np.ndarray, names: list[str]) -> Batch:
        """Rows named by (shard, row) pairs, gathered in file order: one ``np.take`` per shard and column."""
        # A batch's membership is random; its order is not needed, and ascending offsets read ~2x faster.
        sel = sel[np.argsort(sel[:, 0] * (1 << 40) + sel[:, 1])]
        bounds = np.flatnonzero(np.diff(sel[:, 0])) + 1
        first = self.shard(int(sel[0, 0]))
        cols = {}
        for name in names:
            ref = first.column(name)
            out = np.empty((len(sel), *ref.shape[1:]), ref.dtype)
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(sel)]):
                src = self.shard(int(sel[lo, 0])).column(name)
                # mode="clip" lets numpy gather straight into ``out`` without a temporary buffer.
                np.take(src, sel[lo:hi, 1], axis=0, out=out[lo:hi], mode="clip")
            cols[name] = as_tensor(out, first.columns[name].dtype)
        return Batch({h: cols[h] for h in names[: -len(META_COLUMNS)]}, cols["token_id"], cols["doc_id"],
                     cols["position"])

    def _mixed_in_memory(self, hooks: list[str], batch_size: int, buffer_rows: int, gen: torch.Generator,
                         drop_last: bool, shuffle: bool) -> Iterator[Batch]:
        """Remote stores: chunks are read into memory (by byte range) and mixed there."""
        chunk_rows = max(batch_size, buffer_rows // 8) if shuffle else max(batch_size, buffer_rows)
        chunks = self._chunks(chunk_rows)
        if shuffle:
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]
        pending: list[Batch] = []
        held = 0
        for chunk in chunks:
            part = self._read(chunk, hooks)
            pending.append(part)
            held += len(part.doc_id)
            if held >= (buffer_rows if shuffle else batch_size):
                buf = _cat(pending)
                if shuffle:
                    buf = _take(buf, torch.randperm(held, generator=gen))
                keep = buffer_rows // 2 if shuffle else 0
                n_out = (held - keep) // batch_size * batch_size
                for a in range(0, n_out, batch_size):
                    yield _slice(buf, a, a + batch_size)
                pending, held = [_slice(buf, n_out, held)], held - n_out
        if held:
            buf = _cat(pending)
            if shuffle:
                buf = _take(buf, torch.randperm(held, generator=gen))
            stop = held // batch_size * batch_size if drop_last else held
            for a in range(0, stop, batch_size):
                yield _slice(buf, a, min(a + batch_size, held))

    def _checked_hooks(self, hooks: str | list[str] | None) -> list[str]:
        """``hooks`` as a list (None: every hook of the store), each one checked to exist."""
        hooks = list(self.manifest.config.hooks) if hooks is None else [hooks] if isinstance(hooks, str) else hooks
        for h in hooks:
            self.check_hook(h)
        return hooks

    def take(self, index: Sequence[int] | np.ndarray | torch.Tensor, hooks: str | list[str] | None = None) -> Batch:
        """Rows by their place in this view's store order (the order ``rows(shuffle=False)`` yields), as asked.

        ``hooks=[]`` reads only token ids, document ids and positions. Each shard's rows are read in
        file order, once per distinct row.
        """
        hooks = self._checked_hooks(hooks)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise ScopeError(f"row index out of range for store {self.url!r} with {len(self)} rows in this view: "
                             f"got {int(index.min())} … {int(index.max())}")
        names = [*hooks, *META_COLUMNS]
        if not index.size:
            return self._read(_Chunk(0, 0, 0), hooks)
        wanted, inverse = np.unique(index, return_inverse=True)
        starts, kept = self._view_rows()
        shard = np.searchsorted(starts, wanted, side="right") - 1
        local = wanted - starts[shard]
        if kept is not None:  # ``wanted`` is sorted, so shard by shard keeps its order
            local = np.concatenate([kept[s][local[shard == s]] for s in np.unique(shard)])
        sel = np.stack([shard, local], 1)
        got = self._gather(sel, names) if self.fs.is_local else self._read_runs(sel, names)
        return _take(got, torch.from_numpy(inverse.reshape(-1)))

    def _view_rows(self) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Where each shard's rows start in this view's order, and (for document views) which rows it keeps."""
        if self.docs is None:
            sizes, kept = [s.rows for s in self.manifest.shards], None
        else:
            keep_docs = np.fromiter(self.docs, np.int64)
            kept = [np.flatnonzero(np.isin(self.shard(i).read("doc_id", 0, s.rows).numpy(), keep_docs))
                    for i, s in enumerate(self.manifest.shards)]
            sizes = [len(k) for k in kept]
        return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), kept

    def _read_runs(self, sel: np.ndarray, names: list[str]) -> Batch:
        """Rows named by sorted (shard, row) pairs, read as contiguous byte ranges (remote stores)."""
        breaks = np.flatnonzero((np.diff(sel[:, 0]) != 0) | (np.diff(sel[:, 1]) != 1)) + 1
        parts = []
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(sel)]):
            reader, a = self.shard(int(sel[lo, 0])), int(sel[lo, 1])
            cols = {c: reader.read(c, a, a + hi - lo) for c in names}
            parts.append(Batch({h: cols[h] for h in names[: -len(META_COLUMNS)]}, cols["token_id"], cols["doc_id"],
                               cols["position"]))
        return _cat(parts)

    def batches(self, hook: str, batch_size: int = 4096, **kwargs) -> Iterator[torch.Tensor]:
        """Activation batches of one hook, flattened to ``[batch, width]`` (see :meth:`rows`)."""
        for b in self.rows([hook], batch_size=batch_size, **kwargs):
            x = b.acts[hook]
            yield x.reshape(x.shape[0], -1)


def _take(b: Batch, idx: torch.Tensor) -> Batch:
    return Batch({k: v[idx] for k, v in b.acts.items()}, b.token_id[idx], b.doc_id[idx], b.position[idx])


def _slice(b: Batch, a: int, z: int) -> Batch:
    return Batch({k: v[a:z] for k, v in b.acts.items()}, b.token_id[a:z], b.doc_id[a:z], b.position[a:z])


def _cat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return Batch({k: torch.cat([p.acts[k] for p in parts]) for k in parts[0].acts},
                 torch.cat([p.token_id for p in parts]), torch.cat([p.doc_id for p in parts]),
                 torch.cat([p.position for p in parts]))


def _to(b: Batch, dtype: torch.dtype | None, device) -> Batch:
    acts = {k: v.to(device=device, dtype=dtype or v.dtype, non_blocking=True) for k, v in b.acts.items()}
    return replace(b, acts=acts, token_id=b.token_id.to(device), doc_id=b.doc_id.to(device), position=b.position.to(device))
