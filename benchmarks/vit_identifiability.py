"""Class identifiability per block of a small ViT trained on scikit-learn's digits vs its random
initialisation (the offline stand-in for Vilas et al.'s ViT-B/32 study). Prints JSON with --json."""

from __future__ import annotations

import argparse
import json
import time

import torch

from scope.analysis.vision import digits, train_tiny_vit, vit_identifiability


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = []
    for seed in range(args.seeds):
        xtr, ytr, xte, yte = digits(seed=seed)
        t = time.perf_counter()
        vit, untrained = train_tiny_vit(xtr, ytr, epochs=args.epochs, d=args.d, depth=args.depth, seed=seed)
        with torch.no_grad():
            acc = float((vit(xte).argmax(1) == yte).float().mean())
        trained, rand = vit_identifiability(vit.parts(), xte, yte), vit_identifiability(untrained.parts(), xte, yte)
        runs.append({"seed": seed, "train_s": time.perf_counter() - t, "test_accuracy": acc,
                     "trained": trained.to_dict(), "random": rand.to_dict()})
    if args.json:
        print(json.dumps(runs, indent=1))
        return
    for r in runs:
        print(f"seed {r['seed']}: accuracy {r['test_accuracy']:.3f} (trained in {r['train_s']:.0f} s)")
        print(f"  {'site':<9} {'s trained':>9} {'top-1 % trained':>16} {'images % trained':>17} {'top-1 % random':>15}")
        for a, b in zip(r["trained"]["sites"], r["random"]["sites"]):
            print(f"  {a['site']:<9} {a['mean_score']:9.3f} {a['identifiable_pct']:16.1f} {a['inputs_pct']:17.1f} "
                  f"{b['identifiable_pct']:15.1f}")


if __name__ == "__main__":
    main()
