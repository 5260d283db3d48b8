"""What the study scripts share: the sweep arguments, and training a config's dictionaries on its store."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from scope.dictionaries.interop import load_any
from scope.evals import evaluate_many, load_store_model
from scope.errors import ScopeError
from scope.store import ActivationStore
from scope.training import TrainConfig, ensure_store, load_config, train
from scope.training.trainer import CHECKPOINT

EVALS = "evals.json"  # a study's evaluation cache, in its run folder
TIMING = "timing.json"


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


def prepare_outputs(args: argparse.Namespace) -> None:
    """Create the folder of --figures and the parent of --markdown before the study's work, so that an hour of
    training and scoring cannot end on a path it cannot write."""
    figures, markdown = getattr(args, "figures", None), getattr(args, "markdown", None)
    if figures:
        if Path(figures).exists() and not Path(figures).is_dir():
            raise ScopeError(f"--figures {figures!r} is a file; give the folder to write the figures into")
        _make_folder("--figures", figures, Path(figures))
    if markdown:
        if Path(markdown).is_dir():
            raise ScopeError(f"--markdown {markdown!r} is a folder; give the file to write the table to, e.g. "
                             f"{markdown}/table.md")
        _make_folder("--markdown", markdown, Path(markdown).parent)


def _make_folder(flag: str, path: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ScopeError(f"{flag} {path!r}: cannot create the folder {str(folder)!r} ({err.strerror or err}); "
                         "give a path in a folder you can write") from None


def train_sweep(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Path], ActivationStore]:
    """Capture the store if missing, train (or resume) every dictionary; return them and the held-out view."""
    cfg = load_config(args.config, args.overrides)
    ensure_store(cfg)
    saved = train(cfg, args.out, fork_from=getattr(args, "fork_from", None))
    return cfg, saved, ActivationStore(cfg.store).split(args.held_out, seed=0)[1]


def evaluate_cached(path: Path, saes: dict[str, Path], held_out: ActivationStore, lm_tokens: int) -> dict:
    """Evaluate the dictionaries (scope or SAELens folders) not yet in the JSON cache at ``path`` on the held-out
    view, all in one pass that shares the clean and zero-ablated runs; return the whole cache."""
    cache = json.loads(path.read_text()) if path.exists() else {}
    todo = {n: p for n, p in saes.items() if cache.get(n, {}).get("lm_tokens") != lm_tokens}
    if todo:
        results = evaluate_many({n: load_any(p) for n, p in todo.items()}, held_out, model=load_store_model(held_out),
                                lm_tokens=lm_tokens)
        with FileLock(str(path) + ".lock"):  # another study process may have written the cache meanwhile: merge
            cache = json.loads(path.read_text()) if path.exists() else {}
            for r in results:
                cache[r["name"]] = {**r, "lm_tokens": lm_tokens}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
    return cache


def timed_train(cfg: TrainConfig, out: Path) -> dict[str, Path]:
    """Train (or resume) ``cfg`` into ``out``, recording the wall time in OUT/timing.json when the run started from
    scratch (a resumed run's time is not comparable, so it records none)."""
    fresh = not (out / CHECKPOINT).exists()
    t0 = time.perf_counter()
    saved = train(cfg, out)
    if fresh:
        (out / TIMING).write_text(json.dumps({"wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                                              "steps": cfg.trainer.total_tokens // cfg.trainer.batch_size}))
    return saved


def training_time(cfg: TrainConfig, out: Path) -> dict:
    """What :func:`timed_train` recorded for ``out``: wall_s (None if it was resumed or never timed) and steps."""
    recorded = json.loads((out / TIMING).read_text()) if (out / TIMING).exists() else {}
    return {"wall_s": None, "steps": cfg.trainer.total_tokens // cfg.trainer.batch_size, **recorded}


def plus_minus(se: float | None) -> str:
    """' ± SE' to follow a figure, or nothing where there is no standard error (None, or NaN from one window)."""
    return "" if se is None or se != se else f" ± {se:.3f}"


def run_study(main: Callable[[], None]) -> None:
    """Run a study's ``main``: a ScopeError or a refused flag is one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except ScopeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as err:
        if not isinstance(err.code, str):
            raise
        print(f"error: {err.code}", file=sys.stderr)
        sys.exit(2)
