"""Publishing dashboards: statistics from the store, logit effects from the model, the static site.

A site remembers what it was computed from (``site.json``: the dictionary's fingerprint, the
store, the hook and the settings). Publishing a subset into an existing site rewrites only those
features' pages and data and then the index; publishing from a different dictionary, store or
settings into it is refused unless ``overwrite`` starts the site afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scope.analysis.logit_lens import feature_tokens
from scope.dashboards.neuronpedia import write_neuronpedia
from scope.dashboards.records import feature_record, summary, token_names
from scope.dashboards.site import SITE_FORMAT, SITE_META, SITE_VERSION, read_index, read_site_json, render_site
from scope.dashboards.stats import StatsConfig, dictionary_hook, feature_stats, parse_features
from scope.dictionaries.base import Dictionary
from scope.dictionaries.interop import load_any
from scope.errors import ScopeError
from scope.models import LoadedModel, default_device
from scope.store.fs import StoreFS
from scope.store.reader import ActivationStore
from scope.store.windows import load_store_model


LOGIT_BINS = 60


@dataclass
class Published:
    """Where a publish wrote its site and what it covered."""

    index: str
    folder: str
    features: list[int]
    rows: int
    seconds: float
    site_features: int
    neuronpedia: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "folder": self.folder, "features": len(self.features),
                "first": self.features[0], "last": self.features[-1], "rows": self.rows,
                "seconds": round(self.seconds, 1), "features_per_s": round(len(self.features) / self.seconds, 2),
                "site_features": self.site_features, "neuronpedia": self.neuronpedia}


@torch.no_grad()
def decoder_directions(sae: Dictionary, features: Sequence[int]) -> torch.Tensor:
    """Each feature's direction in the input's raw units, decode(eᵢ) − decode(0) (through any whitening)."""
    eye = torch.zeros((len(features), sae.cfg.d_sae), device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    eye[torch.arange(len(features)), torch.as_tensor(list(features), device=eye.device)] = 1
    return (sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))).float()


def fingerprint(sae: Dictionary) -> str:
    """A short hash of a dictionary's saved tensors and config."""
    h = hashlib.sha256(sae.cfg.model_dump_json().encode())
    for name, t in sorted(sae.saved_tensors().items()):
        h.update(name.encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def site_meta(sae: Dictionary, store: ActivationStore, hook: str, cfg: StatsConfig, name: str,
              source: str) -> dict[str, Any]:
    """What a site is computed from; two publishes into one site must agree on all of it."""
    info = store.manifest.config
    rows = len(store) if cfg.max_rows is None else min(len(store), cfg.max_rows)
    return {
        "format": SITE_FORMAT, "version": SITE_VERSION, "name": name, "hook": hook, "model": info.model,
        "corpus": info.source.spec, "context": info.context, "rows": rows,
        "windows": round(sum(s.n_windows for s in store.manifest.shards) * rows / max(len(store), 1)),
        # Compared by content, so another spelling of the same path is the same site.
        "sae": {"kind": sae.kind, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "hook": sae.cfg.hook,
                "fingerprint": fingerprint(sae)},
        "store": {"documents": len(store.documents),
                  "fingerprint": hashlib.sha256(store.manifest.model_dump_json().encode()).hexdigest()[:16]},
        "sae_source": source, "store_url": store.url,
        "settings": cfg.model_dump(exclude={"batch_size"}),
    }


def _check_site(out: str, meta: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix two computations in one site; with ``overwrite``, clear the old one."""
    fs = StoreFS(out)
    if not fs.exists(SITE_META):
        # Only an empty folder becomes a site: pages written into a store or a run would mix with its files.
        if [p for p in fs.listdir() if not p.startswith(".")]:
            raise ScopeError(f"--out {out!r} is a non-empty folder that is not a scope dashboard site (it has no "
                             f"{SITE_META}); choose an empty or new folder, or the folder of an existing site")
        return
    old = read_site_json(fs, SITE_META)
    if not isinstance(old, dict) or old.get("format") != SITE_FORMAT:
        raise ScopeError(f"{fs.url(SITE_META)} is not the {SITE_META} of a scope dashboard site; choose an empty or "
                         "new --out folder")
    keys = ("format", "version", "name", "hook", "model", "corpus", "rows", "sae", "store", "settings")
    diff = [k for k in keys if old.get(k) != meta.get(k)]
    if diff and not overwrite:
        raise ScopeError(f"the site in {out!r} was published from a different {', '.join(diff)}; publish into a new "
                         "--out folder, or pass --overwrite to start this site afresh")
    if diff or overwrite:
        for rel in ("features", "data", "index.html", SITE_META):
            fs.remove(rel, recursive=True)


def publish(sae: Dictionary | str | Path, store: ActivationStore | str, out: str,
            features: str | Sequence[int] | None = None, *, hook: str | None = None, cfg: StatsConfig | None = None,
            model: LoadedModel | None = None, name: str | None = None, logits: int = 10, overwrite: bool = False,
            device: str | torch.device | None = None, neuronpedia: str | None = None,
            progress: bool = True, force_hook: bool = False) -> Published:
    """Compute the dashboards of ``features`` (default: all) over ``store`` and write them into site ``out``.

    ``hook`` other than the dictionary's own is refused unless ``force_hook``.
    """
    t0 = time.time()
    cfg = cfg or StatsConfig()
    dev = default_device(device)
    source = str(sae) if not isinstance(sae, Dictionary) else "(in memory)"
    if not isinstance(sae, Dictionary):
        sae = load_any(sae, device=dev)
    store = ActivationStore(store) if isinstance(store, str) else store
    hook = dictionary_hook(sae, store, hook, force_hook)
    chosen = parse_features(features, sae.cfg.d_sae)
    if logits < 0:
        raise ScopeError(f"logits must be 0 or more (tokens per logit table), got {logits}")
    title = name or (Path(source).name if source != "(in memory)" else f"{sae.kind}-{sae.cfg.d_sae}")
    meta = site_meta(sae, store, hook, cfg, title, source)
    _check_site(out, meta, overwrite)
    index = read_index(out)  # a bad index fails now, not after the pass
    stats = feature_stats(sae, store, chosen, hook=hook, cfg=cfg, device=dev, progress=progress,
                          force_hook=True)  # the hook was settled above
    model = model or load_store_model(store, device=dev)
    tok = model.tokenizer
    names = token_names(stats, lambda ids: tok.batch_decode([[i] for i in ids]))
    effects = {}
    if logits:
        directions = decoder_directions(sae, chosen).to(model.device)
        found = feature_tokens(model, directions, k=logits, bins=LOGIT_BINS)
        effects = dict(zip(chosen, found))
    records = [feature_record(s, names, effects.get(s.feature)) for s in stats]
    index.update({r["feature"]: summary(r) for r in records})
    # site.json first: a publish stopped among its pages leaves a folder that is still this site's
    site = StoreFS(out)
    site.makedirs()
    site.write_atomic(SITE_META, json.dumps(meta, indent=1).encode())
    written = render_site(out, records, index, meta, progress=progress)
    exported = write_neuronpedia(out, neuronpedia) if neuronpedia else []
    return Published(index=written["index"], folder=written["folder"], features=chosen, rows=meta["rows"],
                     seconds=time.time() - t0, site_features=len(index), neuronpedia=exported)
