"""One shard file: a safetensors file of row-aligned tensors, read by row ranges without loading it.

Columns: one tensor per hook point (``[rows, *shape]``), plus ``token_id``, ``doc_id`` and
``position``. A sidecar ``NNNNNN.json`` is written after the shard is renamed into place, so a
shard counts as complete only when both exist; the manifest keeps each shard's crc32.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from scope.errors import ScopeError
from scope.store.fs import StoreFS
from scope.store.manifest import ShardInfo

META_COLUMNS = ("token_id", "doc_id", "position")
_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64}


RECOMPUTE = "re-run the capture that made this store to recompute it"


def shard_name(index: int) -> str:
    return f"shards/{index:06d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shards/{index:06d}.json"


def write_shard(fs: StoreFS, index: int, columns: dict[str, torch.Tensor], first_window: int,
                n_windows: int, rank: int) -> ShardInfo:
    """Write a shard atomically and then its sidecar; return its manifest entry."""
    data = st_save({k: v.contiguous() for k, v in columns.items()})
    info = ShardInfo(name=shard_name(index), rows=int(columns["doc_id"].shape[0]), bytes=len(data),
                     crc32=f"{zlib.crc32(data):08x}", first_window=first_window, n_windows=n_windows, rank=rank)
    fs.write_atomic(info.name, data)
    fs.write_atomic(sidecar_name(index), info.model_dump_json().encode())
    return info


def read_sidecar(fs: StoreFS, index: int) -> ShardInfo | None:
    """The sidecar of a completed shard, or None when the shard is missing or incomplete."""
    if not (fs.exists(sidecar_name(index)) and fs.exists(shard_name(index))):
        return None
    try:
        return ShardInfo.model_validate_json(fs.read_bytes(sidecar_name(index)))
    except ValueError:  # a damaged sidecar proves nothing about its shard: the shard is computed again
        return None


def shard_checksum(fs: StoreFS, name: str, mapped: np.memmap | None = None) -> tuple[str, int]:
    """(crc32 as 8 hex digits, size in bytes) of a shard file, read straight over its memory map if given."""
    size = fs.size(name)
    if mapped is not None:  # no copies, and it warms the pages read next
        return f"{zlib.crc32(mapped):08x}", size
    crc, step = 0, 64 << 20
    for start in range(0, size, step):
        crc = zlib.crc32(fs.read_bytes(name, start, min(size, start + step)), crc)
    return f"{crc:08x}", size


def shard_intact(fs: StoreFS, info: ShardInfo) -> bool:
    """Whether a shard file still has the size and crc32 its record says."""
    return shard_checksum(fs, info.name) == (info.crc32, info.bytes)


def missing_shards(infos: list[ShardInfo], fs: StoreFS, advice: str) -> str:
    """The message for shard files that the manifest lists but the folder lacks."""
    which = ", ".join(f"{int(Path(i.name).stem)} ({fs.url(i.name)})" for i in infos)
    return f"shard{'s' if len(infos) > 1 else ''} {which} {'are' if len(infos) > 1 else 'is'} missing; {advice}"


@dataclass(frozen=True)
class _Column:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the tensor's data in the file

    @property
    def row_bytes(self) -> int:
        return prod(self.shape[1:]) * np.dtype(_NP[self.dtype]).itemsize


class ShardReader:
    """Row-range reads of one shard; local files are memory-mapped, remote ones read by byte range."""

    def __init__(self, fs: StoreFS, info: ShardInfo, verify: bool = True, advice: str = RECOMPUTE):
        self.fs, self.info, self.advice = fs, info, advice
        try:
            self._mmap = np.memmap(fs.path(info.name), dtype=np.uint8, mode="r") if fs.is_local else None
            if verify:
                self._verify()
            (n,) = struct.unpack("<Q", fs.read_bytes(info.name, 0, 8))
            header = json.loads(fs.read_bytes(info.name, 8, 8 + n))
        except ScopeError:  # the checksum's own message (ScopeError is a ValueError)
            raise
        except FileNotFoundError:
            raise ScopeError(missing_shards([info], fs, advice)) from None
        except (ValueError, struct.error, OSError) as err:
            raise ScopeError(f"shard {fs.url(info.name)} is unreadable ({err}); it is corrupted or truncated; "
                             f"{advice}") from err
        header.pop("__metadata__", None)
        self.columns = {k: _Column(v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0]) for k, v in header.items()}

    def _verify(self) -> None:
        crc, size = shard_checksum(self.fs, self.info.name, self._mmap)
        if size != self.info.bytes or crc != self.info.crc32:
            raise ScopeError(
                f"shard {self.fs.url(self.info.name)} failed its checksum (expected crc32 {self.info.crc32} over "
                f"{self.info.bytes} bytes, found {crc} over {size}); it is corrupted; {self.advice} (only the "
                "corrupted shard is captured again)"
            )

    def column(self, name: str) -> np.ndarray:
        """A whole column as a read-only array over the memory map (local shards only; no copy)."""
        col = self.columns[name]
        raw = self._mmap[col.begin : col.begin + col.shape[0] * col.row_bytes]
        return raw.view(_NP[col.dtype]).reshape(col.shape)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one column, as a fresh CPU tensor."""
        col = self.columns[name]
        lo, hi = col.begin + start * col.row_bytes, col.begin + stop * col.row_bytes
        raw = self._mmap[lo:hi] if self._mmap is not None else np.frombuffer(self.fs.read_bytes(self.info.name, lo, hi), np.uint8)
        return as_tensor(np.array(raw).view(_NP[col.dtype]).reshape(stop - start, *col.shape[1:]), col.dtype)


def as_tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A numpy array of a safetensors dtype as a torch tensor (bf16 travels as uint16)."""
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "BF16" else t
