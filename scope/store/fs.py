"""A store folder on any fsspec filesystem, with atomic writes (temporary name, then rename)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StoreFS:
    """Paths relative to one root folder, local or remote (``file://``, ``memory://``, ``s3://``…)."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(str(url))
        self.root = self.root.rstrip("/")
        self._url = str(url)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        return f"{self._url.rstrip('/')}/{rel}" if rel else self._url

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def size(self, rel: str) -> int:
        return self.fs.size(self.path(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write under a temporary name, then rename, so readers never see a partial file."""
        parent = os.path.dirname(rel)
        if parent:
            self.makedirs(parent)
        tmp = f"{rel}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.pipe_file(self.path(tmp), data)
        if self.is_local:
            os.replace(self.path(tmp), self.path(rel))
        else:
            self.fs.mv(self.path(tmp), self.path(rel))

    def remove(self, rel: str, recursive: bool = False) -> None:
        """Delete a file (or, with ``recursive``, a folder) if it is there."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=recursive)


def replace_folder(parent: Path, name: str, fill: Callable[[Path], None]) -> None:
    """Make ``parent/name`` anew, atomically: ``fill`` writes into a temporary folder that then takes its place.

    A reader (or a resumed run) sees either the old folder or the new one, never a half-written one.
    """
    tmp, old = parent / f".{name}.tmp", parent / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if (parent / name).exists():
        (parent / name).rename(old)
    tmp.rename(parent / name)
    shutil.rmtree(old, ignore_errors=True)
