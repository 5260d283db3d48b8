"""What the study scripts share: the sweep arguments, and training a config's dictionaries on its store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scope.dictionaries.interop import load_any
from scope.evals import evaluate_many, load_store_model
from scope.store import ActivationStore
from scope.training import TrainConfig, ensure_store, load_config, train


def sweep_parser(description: str, config: str, out: str) -> argparse.ArgumentParser:
    """--config, --out, --held-out, --markdown, --set and --json; a script adds its own options."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=config)
    ap.add_argument("--out", default=out)
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    return ap


def train_sweep(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Path], ActivationStore]:
    """Capture the store if missing, train (or resume) every dictionary; return them and the held-out view."""
    cfg = load_config(args.config, args.overrides)
    ensure_store(cfg)
    saved = train(cfg, args.out)
    return cfg, saved, ActivationStore(cfg.store).split(args.held_out, seed=0)[1]


def evaluate_cached(path: Path, saes: dict[str, Path], held_out: ActivationStore, lm_tokens: int) -> dict:
    """Evaluate the dictionaries (scope or SAELens folders) not yet in the JSON cache at ``path`` on the held-out
    view, all in one pass that shares the clean and zero-ablated runs; return the whole cache."""
    cache = json.loads(path.read_text()) if path.exists() else {}
    todo = {n: p for n, p in saes.items() if cache.get(n, {}).get("lm_tokens") != lm_tokens}
    if todo:
        results = evaluate_many({n: load_any(p) for n, p in todo.items()}, held_out, model=load_store_model(held_out),
                                lm_tokens=lm_tokens)
        for r in results:
            cache[r["name"]] = {**r, "lm_tokens": lm_tokens}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return cache
