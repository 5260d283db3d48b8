"""Steering and suppression scores of a vector: the AxBench protocol with the offline scorer.

Steering (AxBench, arXiv 2501.17148, its steering evaluation; RePS, arXiv 2505.20809, which
evaluates the same way): generate for every
out-of-concept prompt at every factor α of a grid, rate each response (concept, relevance,
fluency, harmonic mean), choose the α with the best mean harmonic score on the first half of the
prompts, and report the scores at that α on the other half, beside α = 0 (the unsteered model).

Suppression (RePS evaluates concept suppression too; ours is an offline analogue): generate for in-concept prompts with the null-out intervention and
without, and report the same ratings with the concept rating flipped (2 − concept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scope.errors import ScopeError
from scope.models import LoadedModel
from scope.steering.concepts import ConceptData
from scope.steering.generate import RowSteer, generate
from scope.steering.scoring import Scorer
from scope.steering.vector import SteeringVector

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RATINGS = ("concept", "relevance", "fluency", "harmonic")


@dataclass
class Scores:
    concept: float
    relevance: float
    fluency: float
    harmonic: float
    n: int

    @classmethod
    def of(cls, s: dict[str, np.ndarray], idx: Sequence[int]) -> "Scores":
        idx = list(idx)
        return cls(*(float(np.mean(s[k][idx])) for k in RATINGS), n=len(idx))


@dataclass
class SteeringResult:
    concept: str
    method: str
    alphas: list[float]
    select: list[Scores]  # per α, on the selection half
    report: list[Scores]  # per α, on the reporting half
    best_alpha: float
    steer: Scores  # at the chosen α, on the reporting half
    unsteered: Scores  # α = 0, on the reporting half
    suppress: Scores | None = None  # null-out on the suppression prompts
    unsuppressed: Scores | None = None  # the same prompts without intervention
    samples: list[dict[str, Any]] = field(default_factory=list)
    judge: dict[str, Any] | None = None  # the optional LLM judge's mean ratings of the same texts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_vector(model: LoadedModel, vec: SteeringVector, data: ConceptData, scorer: Scorer,
                    alphas: Sequence[float] = DEFAULT_ALPHAS, max_new_tokens: int = 32, temperature: float = 0.7,
                    seed: int = 0, batch_size: int = 128, suppression: bool = True, progress: bool = True,
                    n_samples: int = 3, judge=None) -> SteeringResult:
    """Steering scores over an α grid (α chosen on half the prompts) and suppression scores.

    With a :class:`scope.steering.judge.Judge`, the reporting half at the chosen α and at α = 0 (and
    the suppression texts) are also rated by the judge, under ``result.judge``.
    """
    alphas = sorted({0.0, *map(float, alphas)})
    prompts = [p.instruction for p in data.steer_prompts]
    if len(prompts) < 2:
        raise ScopeError(f"concept {data.concept!r} needs at least 2 steering prompts (half to choose α, half to "
                         f"report), has {len(prompts)}")
    sup = [p.instruction for p in data.suppress_prompts] if suppression else []
    # One row per (α, prompt), then the suppression prompts without and with null-out.
    row_prompts = [p for _ in alphas for p in prompts] + sup + sup
    alpha = torch.tensor([a for a in alphas for _ in prompts] + [0.0] * (2 * len(sup)))
    null = torch.tensor([False] * (len(alphas) * len(prompts) + len(sup)) + [True] * len(sup))
    bar = tqdm(total=len(row_prompts), desc=f"generate {vec.method}", unit="text", disable=not progress,
               dynamic_ncols=True)
    texts = generate(model, row_prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_size=batch_size, rows=RowSteer(vec.hook, vec.w, vec.b, alpha, null), progress=bar)
    bar.close()
    n_steer = len(alphas) * len(prompts)
    s = scorer.score(row_prompts[:n_steer], texts[:n_steer])
    half = len(prompts) // 2
    sel_idx = [list(range(i * len(prompts), i * len(prompts) + half)) for i in range(len(alphas))]
    rep_idx = [list(range(i * len(prompts) + half, (i + 1) * len(prompts))) for i in range(len(alphas))]
    select = [Scores.of(s, i) for i in sel_idx]
    report = [Scores.of(s, i) for i in rep_idx]
    best = int(np.argmax([x.harmonic for x in select]))
    result = SteeringResult(concept=data.concept, method=vec.method, alphas=alphas, select=select, report=report,
                            best_alpha=alphas[best], steer=report[best], unsteered=report[alphas.index(0.0)])
    for i in range(min(n_samples, len(prompts) - half)):
        j = half + i
        result.samples.append({"prompt": prompts[j], "unsteered": texts[alphas.index(0.0) * len(prompts) + j],
                               "steered": texts[best * len(prompts) + j]})
    if judge is not None:
        result.judge = _judge(judge, data.concept, row_prompts, texts, rep_idx[best], rep_idx[alphas.index(0.0)],
                              n_steer, len(sup))
    if sup:
        base = scorer.score(sup, texts[n_steer : n_steer + len(sup)], suppress=True)
        nulled = scorer.score(sup, texts[n_steer + len(sup) :], suppress=True)
        result.unsuppressed = Scores.of(base, range(len(sup)))
        result.suppress = Scores.of(nulled, range(len(sup)))
        for i in range(min(n_samples, len(sup))):
            result.samples.append({"prompt": sup[i], "unsuppressed": texts[n_steer + i],
                                   "suppressed": texts[n_steer + len(sup) + i]})
    return result


def _judge(judge, concept: str, prompts: list[str], texts: list[str], best: list[int], zero: list[int],
           n_steer: int, n_sup: int) -> dict[str, Any]:
    def mean(idx: list[int], suppress: bool = False) -> dict[str, float]:
        s = judge.rate(concept, [prompts[i] for i in idx], [texts[i] for i in idx], suppress=suppress)
        return {k: float(np.mean(v)) for k, v in s.items()}

    out = {"model": judge.model, "steer": mean(best), "unsteered": mean(zero)}
    if n_sup:
        out["unsuppressed"] = mean(list(range(n_steer, n_steer + n_sup)), suppress=True)
        out["suppress"] = mean(list(range(n_steer + n_sup, n_steer + 2 * n_sup)), suppress=True)
    return out


def alpha_figure(results: Sequence[SteeringResult], title: str = "Steering score vs factor α"):
    """Mean harmonic score (all prompts) against α, one line per result (method or concept)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        y = [(s.harmonic * s.n + q.harmonic * q.n) / (s.n + q.n) for s, q in zip(r.select, r.report)]
        fig.add_trace(go.Scatter(x=r.alphas, y=y, mode="lines+markers", name=f"{r.method} {r.concept}"))
    fig.update_layout(title=title, xaxis_title="α (units of the layer's centred RMS norm for DiffMean; "
                      "trained vectors carry their own norm)", yaxis_title="harmonic mean of ratings (0–2)")
    return fig


def result_from_dict(d: dict[str, Any]) -> SteeringResult:
    """A :class:`SteeringResult` from :meth:`SteeringResult.to_dict` output (e.g. a saved eval.json)."""
    def sc(x):
        return None if x is None else Scores(**x)

    return SteeringResult(concept=d["concept"], method=d["method"], alphas=d["alphas"],
                          select=[Scores(**x) for x in d["select"]], report=[Scores(**x) for x in d["report"]],
                          best_alpha=d["best_alpha"], steer=Scores(**d["steer"]), unsteered=Scores(**d["unsteered"]),
                          suppress=sc(d.get("suppress")), unsuppressed=sc(d.get("unsuppressed")),
                          samples=d.get("samples", []), judge=d.get("judge"))
