"""Delta loss against training budget: the same dictionaries trained for several lengths, each with its own schedule.

A snapshot taken halfway through a run sits at the peak learning rate, so a curve of snapshots measures the
schedule more than the budget. This script reads instead the *final* dictionaries of quality studies that differ
only in ``trainer.total_tokens`` (each run warms up, holds, and decays its learning rate over its last 20 %), from
each study's evaluation cache (``benchmarks/sae_quality.py --no-train`` writes it), and puts them side by side:
delta loss, L0 and dead latents per budget, the gap between two of them, and a power-law fit
``delta = a · budget^(−b)`` per dictionary that says at which budget the gap would reach ``--lead`` nats if the fits
held beyond the budgets measured (an extrapolation, printed as one).

Run:  python benchmarks/sae_budget.py [--study CONFIG=RUN[@NAME] ...] [--first NAME] [--second NAME] [--lead 0.05]
          [--figures DIR] [--markdown PATH] [--json]
The defaults are the layer-6 studies at 5M, 10M, 20M and 40M token-steps (``sae_configs/gemma-3-270m-res-l6-quality-
*-4k.yaml`` with ``runs/quality-*``); a study whose final dictionaries are not evaluated yet is skipped with a note.
``@NAME`` reads that study's NAME in place of ``--first``, for a length at which the recipe needed a change (the
table says so): at 40M the shipped JumpReLU recipe collapsed at its hand-over from BatchTopK, and its 40M point is
the same recipe with the BatchTopK phase capped at 16M token-steps (docs/methods/sae_quality.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from sweep import EVALS, plus_minus, prepare_outputs, run_study

from scope.analysis.output import write_results
from scope.errors import ScopeError
from scope.evals.lm_loss import paired_difference
from scope.training import load_config

LENGTHS = ("5m", "10m", "20m", "40m")
STAND_INS = {"40m": "jumprelu-btk16m-eps2e-3"}
DEFAULT_STUDIES = [f"sae_configs/gemma-3-270m-res-l6-quality-{n}-4k.yaml=runs/quality-{n}"
                   + (f"@{STAND_INS[n]}" if n in STAND_INS else "") for n in LENGTHS]


@dataclass(frozen=True)
class Point:
    """One final dictionary of one study."""

    name: str
    token_steps: int
    l0: float
    dead_fraction: float
    delta_loss: float
    ce_loss_recovered: float
    kl: float
    lm_tokens: int
    delta_loss_se: float | None  # None for an evaluation cached before scope kept per-window sums
    lm: dict = field(repr=False, compare=False)  # the whole LM-loss evaluation, for paired differences
    trained_as: str | None = None  # the study's own name for it, when a stand-in (CONFIG=RUN@NAME) replaced it


@dataclass(frozen=True)
class Fit:
    """delta = a · token_steps^(−b), least squares in log-log space."""

    name: str
    a: float
    b: float
    points: int

    def at(self, token_steps: float) -> float:
        return self.a * token_steps ** -self.b


def final_points(config: str, run: str, names: list[str], stand_in: dict[str, str] | None = None
                 ) -> tuple[list[Point], str | None]:
    """The named dictionaries' final evaluations in one study, or a note saying why there are none; ``stand_in``
    maps a name to the study's dictionary read in its place."""
    cfg = load_config(config)
    final_step = cfg.trainer.total_tokens // cfg.trainer.batch_size
    path = Path(run) / EVALS
    if not path.exists():
        return [], f"{run}: no {EVALS} yet (train, then run benchmarks/sae_quality.py --no-train --config {config} --out {run})"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable evaluation cache ({err}); delete it and run benchmarks/sae_quality.py "
                         f"--no-train --config {config} --out {run} to evaluate again") from None
    stand_in = stand_in or {}
    unknown = [n for n in stand_in.values() if n not in {d.name for d in cfg.dictionaries}]
    if unknown:
        raise SystemExit(f"--study {config}={run}@{unknown[0]}: {config} has no dictionary {unknown[0]!r}; it has "
                         + ", ".join(d.name for d in cfg.dictionaries))
    points = []
    for name in names:
        own = stand_in.get(name, name)
        r = cache.get(f"{own}@{final_step}")
        if r is None or not r.get("lm"):
            continue
        lm = r["lm"]
        points.append(Point(name, final_step * cfg.trainer.batch_size, r["l0"], r["dead_fraction"], lm["delta_loss"],
                            lm["ce_loss_recovered"], lm["kl"], r["lm_tokens"], lm.get("delta_loss_se"), lm,
                            None if own == name else own))
    missing = [stand_in.get(n, n) for n in names if n not in {p.name for p in points}]
    return points, (f"{run}: {', '.join(missing)} not evaluated at step {final_step}" if missing else None)


def power_fit(name: str, points: list[Point]) -> Fit | None:
    """The least-squares line through (log budget, log delta); None with fewer than two budgets.
    A delta loss at or below zero (a dictionary no worse than the model itself) has no logarithm and is left out."""
    pts = [(math.log(p.token_steps), math.log(p.delta_loss)) for p in points if p.name == name and p.delta_loss > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return Fit(name, math.exp(my - slope * mx), -slope, len(pts))


def _grid(start: float) -> list[float]:
    """Budgets from ``start`` to 10¹², 5 % apart."""
    return [start * 1.05 ** i for i in range(int(math.log(1e12 / start) / math.log(1.05)) + 1)]


def budget_for_lead(first: Fit, second: Fit, lead: float, start: float) -> float | None:
    """The smallest budget ≥ ``start`` (up to 10¹²) at which ``second``'s fitted delta exceeds ``first``'s by ``lead``."""
    return next((b for b in _grid(start) if second.at(b) - first.at(b) >= lead), None)


def largest_gap(first: Fit, second: Fit, start: float) -> tuple[float, float]:
    """(budget, gap) where ``second``'s fitted delta exceeds ``first``'s the most, between ``start`` and 10¹².

    Both fits fall towards zero, so their difference does too: a gap that opens with budget peaks and closes
    again, and a lead in nats is bounded even when the ratio of the two keeps growing."""
    return max(((b, second.at(b) - first.at(b)) for b in _grid(start)), key=lambda t: t[1])


def gaps(points: list[Point], first: str, second: str) -> dict[int, tuple[float, float | None]]:
    """Per budget where both were evaluated: second's delta loss − first's, and its paired standard error
    (None when either evaluation predates per-window sums)."""
    out = {}
    for budget in sorted({p.token_steps for p in points}):
        row = {p.name: p for p in points if p.token_steps == budget}
        if first in row and second in row:
            a, b = row[first].lm, row[second].lm
            try:
                se = paired_difference(a, b)[1]
            except ScopeError:
                se = None
            out[budget] = (b["delta_loss"] - a["delta_loss"], se)
    return out


def table(points: list[Point], first: str, second: str) -> str:
    """Markdown: one row per budget, each dictionary's delta loss (± its standard error), L0 and dead fraction,
    and the gap with its paired standard error."""
    lines = [f"| token-steps | {first}: delta, L0, dead | {second}: delta, L0, dead | gap ({second} − {first}) |",
             "| ---: | ---: | ---: | ---: |"]
    paired = gaps(points, first, second)
    for budget in sorted({p.token_steps for p in points}):
        row = {p.name: p for p in points if p.token_steps == budget}
        cells = [f"{row[n].delta_loss:.3f}{plus_minus(row[n].delta_loss_se)}, {row[n].l0:.1f}, {row[n].dead_fraction:.1%}"
                 + (f" ({row[n].trained_as})" if row[n].trained_as else "") if n in row else "—" for n in (first, second)]
        gap = f"{paired[budget][0]:+.3f}{plus_minus(paired[budget][1])}" if budget in paired else "—"
        lines.append(f"| {budget / 1e6:.1f}M | {cells[0]} | {cells[1]} | {gap} |")
    return "\n".join(lines)


def figure(points: list[Point], fits: list[Fit]) -> go.Figure:
    """Delta loss against budget, log-log, with each power-law fit dashed."""
    fig = go.Figure()
    budgets = sorted({p.token_steps for p in points})
    for fit in fits:
        own = sorted((p for p in points if p.name == fit.name), key=lambda p: p.token_steps)
        fig.add_trace(go.Scatter(x=[p.token_steps for p in own], y=[p.delta_loss for p in own], mode="markers+lines",
                                 name=fit.name, customdata=[[p.l0, p.dead_fraction] for p in own],
                                 hovertemplate="%{x:,} token-steps<br>delta %{y:.3f} nats<br>L0 %{customdata[0]:.1f}"
                                               "<br>dead %{customdata[1]:.1%}"))
        xs = [budgets[0] * (budgets[-1] * 4 / budgets[0]) ** (i / 40) for i in range(41)]
        fig.add_trace(go.Scatter(x=xs, y=[fit.at(x) for x in xs], mode="lines", line={"dash": "dash"},
                                 name=f"{fit.name}: fit, exponent {fit.b:.2f}"))
    fig.update_layout(title="Final delta loss against training budget (each run with its own learning-rate decay)",
                      xaxis={"title": "token-steps", "type": "log"}, yaxis={"title": "delta loss (nats)", "type": "log"},
                      margin={"t": 80})
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", action="append", default=None, metavar="CONFIG=RUN",
                    help="a quality study's config and run folder (repeat; default: the 5M-40M layer-6 studies)")
    ap.add_argument("--first", default="jumprelu-btk80-eps2e-3", help="the dictionary expected to lead")
    ap.add_argument("--second", default="topk-clip", help="the dictionary it is compared with")
    ap.add_argument("--lead", type=float, default=0.05, help="the lead in nats whose budget the fits estimate")
    ap.add_argument("--out", default="runs/quality-budget", help="folder for budget.json and the figure")
    ap.add_argument("--figures", default=None, help="also copy the figure's HTML into this folder (e.g. docs/figures)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prepare_outputs(args)
    names, points, notes = [args.first, args.second], [], []
    for study in args.study or DEFAULT_STUDIES:
        config, sep, run = study.partition("=")
        run, at, own = run.partition("@")
        if not sep or not Path(config).is_file() or (at and not own):
            raise SystemExit(f"--study {study!r}: expected CONFIG=RUN or CONFIG=RUN@NAME with CONFIG an existing "
                             "sae_configs YAML file and NAME one of its dictionaries")
        found, note = final_points(config, run, names, {args.first: own} if own else None)
        points += found
        if note:
            notes.append(note)
    if not points:
        raise SystemExit("no study has final evaluations of " + " or ".join(names) + ":\n  " + "\n  ".join(notes))
    fits = [f for f in (power_fit(n, points) for n in names) if f is not None]
    lead_at = peak = None
    if len(fits) == 2:
        lead_at = budget_for_lead(fits[0], fits[1], args.lead, max(p.token_steps for p in points))
        peak = largest_gap(fits[0], fits[1], min(p.token_steps for p in points))
    report = {"points": [{k: v for k, v in asdict(p).items() if k != "lm"} for p in points],
              "gaps": [{"token_steps": b, "gap": g, "gap_se": se} for b, (g, se) in gaps(points, *names).items()],
              "fits": [asdict(f) for f in fits], "lead": args.lead, "lead_budget": lead_at,
              "largest_fitted_gap": None if peak is None else {"token_steps": peak[0], "gap": peak[1]}, "notes": notes}
    written = write_results(args.out, "budget.json", report, {"sae_quality_budget": figure(points, fits)})
    if args.figures:
        shutil.copy(written["sae_quality_budget"], Path(args.figures) / "sae_quality_budget.html")
    md = table(points, args.first, args.second)
    fit_lines = [f"{f.name}: delta ≈ {f.a:.3g} · token-steps^−{f.b:.3f} ({f.points} budgets)" for f in fits]
    if len(fits) == 2:
        fit_lines.append(f"a {args.lead} nats lead of {args.first} over {args.second}: " + (
            f"at ~{lead_at / 1e6:,.0f}M token-steps if the fits held that far (an extrapolation)" if lead_at
            else "not reached by the fits (up to 10^12 token-steps)"))
        nxt = 2 * max(p.token_steps for p in points)
        fit_lines.append(f"the fits at {nxt / 1e6:,.0f}M token-steps (twice the largest budget measured, a prediction to "
                         f"test): {fits[0].name} {fits[0].at(nxt):.3f}, {fits[1].name} {fits[1].at(nxt):.3f}, gap "
                         f"{fits[1].at(nxt) - fits[0].at(nxt):+.3f}")
        fit_lines.append(f"the fits' largest gap: {peak[1]:+.3f} nats at ~{peak[0] / 1e6:,.0f}M token-steps "
                         "(both fall towards zero, so the gap in nats closes again beyond it)")
    if args.markdown:
        Path(args.markdown).write_text(md + "\n\n" + "\n".join(f"- {line}" for line in fit_lines) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join([md, "", *fit_lines, *notes]))


if __name__ == "__main__":
    run_study(main)
