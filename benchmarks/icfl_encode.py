"""ICFL encode speed: scope's batched matching pursuit against scikit-learn's per-sample OMP, in one run.

Both code the same rows over the same unit-norm codebook with the same budget of J·L nonzeros.
scikit-learn's ``orthogonal_mp`` is classical OMP: one atom per step and a full least-squares refit
of the support, one target at a time (its loop over targets is in Python). scope's encoder picks L
atoms per iteration, fits only those, and runs every row of the batch at once (scope/dictionaries/
icfl.py). The two are not the same algorithm, so the residual FVU of each is printed beside the
speed. Target (issue 4): >= 20x samples/s.

Run:  python benchmarks/icfl_encode.py [--store DIR] [--atoms 8192] [--iterations 20] [--per-iteration 5]
                                       [--rows 8192] [--sklearn-rows 256] [--json]
Without ``--store`` the rows are random; with one, they are layer activations from the store
(centred and scaled to unit mean square norm, as ICFL trains on them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rows_from(store: str | None, n: int, d: int, seed: int) -> torch.Tensor:
    if store is None:
        return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    from scope.store import ActivationStore

    s = ActivationStore(store)
    hook = next(iter(s.hooks))
    x = next(iter(s.batches(hook, batch_size=n, seed=seed, buffer_rows=max(n, 1 << 16), dtype=torch.float32)))
    x = x - x.mean(0)
    return x / x.pow(2).sum(-1).mean().sqrt()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--atoms", type=int, default=8192)
    ap.add_argument("--d-in", type=int, default=640, help="width of random rows (ignored with --store)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--per-iteration", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8192, help="rows for scope's batched encoder")
    ap.add_argument("--sklearn-rows", type=int, default=256, help="rows for scikit-learn (it is slow)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from sklearn.linear_model import orthogonal_mp

    from scope.dictionaries import matching_pursuit

    x = rows_from(args.store, args.rows, args.d_in, seed=0)
    d = x.shape[1]
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(args.atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    budget = args.iterations * args.per_iteration

    matching_pursuit(x[:256], atoms, args.iterations, args.per_iteration)  # warm-up
    t0 = time.perf_counter()
    z = matching_pursuit(x, atoms, args.iterations, args.per_iteration)
    scope_s = time.perf_counter() - t0
    scope_rate = x.shape[0] / scope_s

    xs = x[: args.sklearn_rows].double().numpy()
    t0 = time.perf_counter()
    coef = orthogonal_mp(atoms.double().numpy().T, xs.T, n_nonzero_coefs=budget, precompute=True)
    sk_s = time.perf_counter() - t0
    sk_rate = xs.shape[0] / sk_s
    sk_hat = torch.from_numpy((atoms.double().numpy().T @ coef).T).float()

    out = {
        "rows": int(x.shape[0]), "sklearn_rows": int(xs.shape[0]), "d_in": d, "atoms": args.atoms,
        "iterations": args.iterations, "per_iteration": args.per_iteration, "nonzeros_budget": budget,
        "data": args.store or "random", "threads": torch.get_num_threads(),
        "scope_samples_per_s": scope_rate, "sklearn_samples_per_s": sk_rate, "ratio": scope_rate / sk_rate,
        "scope_fvu": fvu(x, z @ atoms), "sklearn_fvu": fvu(x[: xs.shape[0]], sk_hat),
        "scope_l0": float((z != 0).sum(-1).float().mean()), "sklearn_l0": float((coef != 0).sum(0).mean()),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"ICFL encode, {args.atoms} atoms of width {d}, J={args.iterations} x L={args.per_iteration} "
          f"(<= {budget} nonzeros), data: {out['data']}, {out['threads']} threads")
    print(f"  scope batched   {scope_rate:10.1f} samples/s  FVU {out['scope_fvu']:.3f}  L0 {out['scope_l0']:.1f}")
    print(f"  sklearn OMP     {sk_rate:10.1f} samples/s  FVU {out['sklearn_fvu']:.3f}  L0 {out['sklearn_l0']:.1f}")
    print(f"  ratio           {out['ratio']:10.1f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
