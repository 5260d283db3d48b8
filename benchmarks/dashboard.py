"""Feature-dashboard throughput: scope against sae-dashboard (in its own venv), same dictionary, same tokens, one run.

What is timed, in features per second for the whole dashboard of the chosen features:

* **scope** — ``scope.dashboards.publish`` from the activation store: the one-pass statistics (top-k
  with context, quantile-interval samples, histogram, density, correlations), the logit effects, and
  the static site (index, one page per feature, the data files).
* **sae-dashboard** — ``SaeVisRunner.run`` (its defaults: top 20 activations, 10 activation intervals of
  5 examples, histograms, logit tables and histogram, correlated features and neurons) and
  ``save_feature_centric_vis`` (one HTML file), run by benchmarks/saedash_side.py under the
  sae-dashboard venv's python.

Both see exactly the same numbers. The dictionary is exported with ``scope export saelens``'s code and
loaded by SAELens (``SAE.load_from_disk``). The model is Gemma 3 270M from scope's local float
safetensors folder, loaded by transformers and TransformerLens 2.x (``HookedSAETransformer``, no weight
processing, the residual stream scope's bridge captures). The tokens are the store's context windows
(BOS, then the rows of the window; shorter windows padded, BOS and padding ignored). By default
sae-dashboard does not run the model: its activation cache (``cache_dir``, one file per token batch)
is filled from the store's rows, so both start from stored activations. ``--end-to-end`` also times
both from tokens: sae-dashboard running the model itself (once per feature batch, as it does), and
scope capturing a store of the same windows and publishing from it.

Settings are matched: 20 top examples, 10 intervals of 5, 5 context tokens either side, 3 correlated
features, 10 tokens per logit table. Model and SAE loading are not timed. Each library runs in its own
process, one after the other, with the same torch thread count. Agreement is checked on a few features:
the same firing counts, and maxima equal up to sae-dashboard's ``fold_W_dec_norm`` (it rescales each
feature by its decoder row's norm). Target (issue): scope >= 10x sae-dashboard features/s.

Run (after ``bash benchmarks/saedash_venv.sh``):
    python benchmarks/dashboard.py --store scope-out/store --sae scope-out/sae/jumprelu [--features 0:4096]
        [--rows 20000] [--threads 2] [--end-to-end] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SIDE = HERE / "saedash_side.py"
DEFAULT_PYTHON = "/work/saedash-venv/bin/python"
TARGET = 10.0
SETTINGS = dict(top_k=20, intervals=10, per_interval=5, left=5, right=5, correlated=3)
LOGITS = 10


def windows_from_store(store, hook: str, rows: int | None, bos: int, pad: int, context: int):
    """Token windows [n, context] (BOS + the window's rows, padded) and their activations, from the first rows."""
    tokens, acts, lengths = [], [], []
    cur_t, cur_a, last = [], [], None
    taken = 0

    def close():
        if cur_t:
            tokens.append([bos, *cur_t])
            acts.append(torch.stack(cur_a))
            lengths.append(len(cur_t))

    for b in store.rows([hook], batch_size=4096, shuffle=False, dtype=torch.float32):
        for i in range(len(b.token_id)):
            key = (int(b.doc_id[i]), int(b.position[i]))
            if last is None or key[0] != last[0] or key[1] != last[1] + 1:
                close()
                if rows is not None and taken >= rows:
                    return _pad(tokens, acts, pad, context), sum(lengths)
                if key[1] != 1:
                    raise SystemExit(f"store rows start a window at position {key[1]}; the benchmark needs stores "
                                     "that leave out only BOS (scope cache's default)")
                cur_t, cur_a = [], []
            cur_t.append(int(b.token_id[i]))
            cur_a.append(b.acts[hook][i].reshape(-1))
            last = key
            taken += 1
    close()
    return _pad(tokens, acts, pad, context), sum(lengths)


def _pad(tokens, acts, pad: int, context: int):
    n, d = len(tokens), acts[0].shape[1]
    tok = torch.full((n, context), pad, dtype=torch.int64)
    act = torch.zeros((n, context, d))
    for i, (t, a) in enumerate(zip(tokens, acts)):
        tok[i, : len(t)] = torch.tensor(t)
        act[i, 1 : len(t)] = a  # BOS (position 0) and padding stay zero; sae-dashboard ignores them
    return tok, act


@torch.no_grad()
def firing_features(sae, acts: torch.Tensor, tokens: torch.Tensor, features: list[int], bos: int, pad: int,
                    n: int = 8) -> list[int]:
    """``n`` of the chosen features that fire on these windows, spread over the list, for the agreement check."""
    real = (tokens != bos) & (tokens != pad)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for a in range(0, len(acts), 64):
        fires |= (sae.encode(acts[a : a + 64][real[a : a + 64]]) > 0).any(0)
    alive = [f for f in features if fires[f]]
    return alive[:: max(1, len(alive) // n)][:n]


def model_dir() -> str:
    from scope.models import cache_dir

    found = sorted(glob.glob(str(cache_dir() / "models" / "gemma-3-270m-*")))
    if not found:
        raise SystemExit("no converted Gemma 3 270M in scope's cache; run `scope hooks` once to convert it")
    return found[0]


def worker_scope(job: dict) -> dict:
    from scope.dashboards import StatsConfig, publish
    from scope.models import load_model

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    model = load_model("gemma-3-270m", device="cpu")
    load_s = time.perf_counter() - t
    cfg = StatsConfig(max_rows=job["rows"], **SETTINGS)
    t = time.perf_counter()
    capture_s = 0.0
    store = job["store"]
    if job["end_to_end"]:
        from scope.data import open_source
        from scope.store import ActivationStore, capture_store

        src = ActivationStore(store).manifest.config
        store = job["fresh_store"]
        capture_store(model, open_source(src.source.spec), list(src.hooks), store, job["rows"], context=src.context,
                      dtype=src.dtype, seed=src.seed, excluded=tuple(src.excluded), progress=False)
        capture_s = time.perf_counter() - t
    done = publish(job["sae"], store, job["site"], job["features"], cfg=cfg, model=model, logits=LOGITS,
                   device="cpu", progress=False)
    seconds = time.perf_counter() - t
    checks = {}
    for f in job["check"]:
        rec = json.loads((Path(job["site"]) / "data" / "features" / f"{f:06d}.json").read_text())
        checks[str(f)] = {"count": rec["count"], "max": rec["max"]}
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    return {"library": "scope", "torch": torch.__version__, "threads": torch.get_num_threads(), "load_s": load_s,
            "capture_s": capture_s, "seconds": seconds, "rows": done.rows, "checks": checks, "peak_rss_mb": hwm,
            "site_mb": sum(p.stat().st_size for p in Path(job["site"]).rglob("*") if p.is_file()) / 2**20}


def run_json(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(args) -> dict:
    from scope.dashboards.stats import dictionary_hook, parse_features
    from scope.dictionaries.interop import load_any, to_saelens
    from scope.models import load_model
    from scope.store import ActivationStore

    t0 = time.time()
    store = ActivationStore(args.store)
    sae = load_any(args.sae)
    hook = dictionary_hook(sae, store)
    features = parse_features(args.features, sae.cfg.d_sae)
    tok = load_model("gemma-3-270m", device="cpu").tokenizer
    work = Path(tempfile.mkdtemp(prefix="dashbench-", dir=args.workdir))
    (tokens, acts), rows = windows_from_store(store, hook, args.rows, tok.bos_token_id, tok.pad_token_id,
                                              store.manifest.config.context)
    check = firing_features(sae, acts, tokens, features, tok.bos_token_id, tok.pad_token_id)
    save_file({"tokens": tokens}, str(work / "tokens.safetensors"))
    cache = work / "cache"
    cache.mkdir()
    for i, a in enumerate(acts.split(args.token_batch)):
        torch.save({hook: a.contiguous()}, cache / f"model_activations_{i}.pt")
    del acts
    to_saelens(sae, work / "saelens")
    norms = (sae.saved_tensors()["W_dec"].norm(dim=1)).tolist()
    threads = args.threads
    results = {}
    for mode in ["stored", *(["end-to-end"] if args.end_to_end else [])]:
        e2e = mode == "end-to-end"
        job = {"store": args.store, "sae": args.sae, "features": features, "rows": rows, "threads": threads,
               "site": str(work / f"site-{mode}"), "check": check, "end_to_end": e2e,
               "fresh_store": str(work / "fresh-store")}
        scope = run_json([sys.executable, __file__, "--worker", json.dumps(job)], f"scope ({mode})")
        side = {"sae_dir": str(work / "saelens"), "model_dir": model_dir(), "tokens": str(work / "tokens.safetensors"),
                "hook": hook, "features": features, "feature_batch": args.feature_batch,
                "token_batch": args.token_batch, "ignore_tokens": [tok.bos_token_id, tok.pad_token_id],
                "cache_dir": None if e2e else str(cache), "html": str(work / f"saedash-{mode}"),
                "check": check, "threads": threads, "chunk": args.chunk}
        peer = run_json([args.saedash_python, str(SIDE), json.dumps(side)], f"sae-dashboard ({mode})")
        results[mode] = {"scope": scope, "sae_dashboard": peer}
        for r in (scope, peer):
            if "error" not in r:
                r["features_per_s"] = len(features) / r["seconds"]
        if "error" not in scope and "error" not in peer:
            results[mode]["speedup"] = scope["features_per_s"] / peer["features_per_s"]
    agreement = _agreement(results["stored"], check, norms, len(tokens) * tokens.shape[1])
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": {"store": args.store, "sae": args.sae, "kind": sae.kind, "d_sae": sae.cfg.d_sae, "hook": hook,
                       "features": len(features), "rows": rows, "windows": len(tokens), "context": tokens.shape[1],
                       "threads": threads or torch.get_num_threads(), "settings": SETTINGS, "logits": LOGITS,
                       "feature_batch": args.feature_batch, "token_batch": args.token_batch, "chunk": args.chunk,
                       "workdir": str(work) if args.keep else None},
            "results": results, "agreement": agreement, "target": TARGET,
            "met": all(r.get("speedup", 0) >= TARGET for r in results.values()), "runtime_s": time.time() - t0}


def _agreement(res: dict, check: list[int], norms: list[float], positions: int) -> dict:
    """Firing counts and maxima of a few features from both libraries (sae-dashboard's maxima are ×‖W_dec,i‖)."""
    s, p = res["scope"].get("checks"), res["sae_dashboard"].get("checks")
    if not s or not p:
        return {}
    out = {}
    for f in check:
        a, b = s[str(f)], p[str(f)]
        count = round(b["density"] * positions) if b["density"] is not None else None
        peer_max = b["max"] / norms[f] if norms[f] else math.nan
        out[str(f)] = {"count": [a["count"], count], "max": [a["max"], peer_max]}
    return out


def report(res: dict) -> str:
    c = res["config"]
    lines = [f"feature dashboards of a {c['kind']} dictionary ({c['d_sae']} features) on {c['hook']}: "
             f"{c['features']} features over {c['rows']:,} rows ({c['windows']} windows of {c['context']}), "
             f"{c['threads']} threads",
             f"settings (both): top 20, 10 intervals x 5, 5 context tokens each side, 3 correlated features, "
             f"{c['logits']} logit tokens; sae-dashboard feature batch {c['feature_batch']}, token batch "
             f"{c['token_batch']}, one run and HTML file per {c['chunk']} features"]
    head = f"{'mode':<12}{'library':<16}{'seconds':>10}{'features/s':>12}{'ratio':>8}{'peak RSS MiB':>14}"
    lines += ["", head, "-" * len(head)]
    for mode, r in res["results"].items():
        for name, key in (("scope", "scope"), ("sae-dashboard", "sae_dashboard")):
            x = r[key]
            if "error" in x:
                lines.append(f"{mode:<12}{name:<16}  FAILED: {x['error'][:90]}")
                continue
            ratio = f"{r['speedup']:.1f}x" if key == "scope" and "speedup" in r else ""
            extra = f"  (capture {x['capture_s']:.1f} s)" if x.get("capture_s") else ""
            lines.append(f"{mode:<12}{name:<16}{x['seconds']:>10.1f}{x['features_per_s']:>12.2f}{ratio:>8}"
                         f"{x['peak_rss_mb']:>14.0f}{extra}")
    if res["agreement"]:
        lines += ["", "agreement (scope / sae-dashboard): firing count, max activation"]
        for f, a in res["agreement"].items():
            lines.append(f"  feature {f:>5}: count {a['count'][0]} / {a['count'][1]}, "
                         f"max {a['max'][0]:.4g} / {a['max'][1]:.4g}")
    speed = ", ".join(f"{m} {r['speedup']:.1f}x" for m, r in res["results"].items() if "speedup" in r)
    lines += ["", f"target: scope >= {res['target']:.0f}x sae-dashboard features/s: {speed or '-'} -> "
              f"{'met' if res['met'] else 'NOT met'}", f"runtime {res['runtime_s']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="scope activation store (e.g. scope-out/store from `scope quickstart`)")
    p.add_argument("--sae", help="scope dictionary trained on it (e.g. scope-out/sae/jumprelu)")
    p.add_argument("--features", default=None, help="features to publish (default: all of them)")
    p.add_argument("--rows", type=int, default=None, help="use the windows covering the first N rows (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in both processes (0: torch's default)")
    p.add_argument("--end-to-end", action="store_true", help="also time both from tokens (model forward included)")
    p.add_argument("--feature-batch", type=int, default=256, help="sae-dashboard minibatch_size_features")
    p.add_argument("--token-batch", type=int, default=64, help="sae-dashboard minibatch_size_tokens (windows)")
    p.add_argument("--chunk", type=int, default=256, help="features per sae-dashboard run and HTML file (one file "
                   "for thousands of features does not fit in memory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (sites, cache, exports)")
    p.add_argument("--saedash-python", default=os.environ.get("SCOPE_SAEDASH_PYTHON", DEFAULT_PYTHON),
                   help="python of the venv built by benchmarks/saedash_venv.sh")
    p.add_argument("--workdir", default=None, help="folder for the temporary files (default: system temp)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker_scope(json.loads(args.worker))))
        return
    if not args.store or not args.sae:
        p.error("--store and --sae are required")
    res = bench(args)
    print(json.dumps(res, indent=2) if args.json else report(res))


if __name__ == "__main__":
    main()
