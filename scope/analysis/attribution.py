"""Which features drive a prediction: attribution patching and direct logit attribution, checked by ablation.

The scalar explained is a function of the next-token distribution after the prompt: log p(target),
or the logit difference logit(target) − logit(other) (equal to log p(target) − log p(other)). The
effect of a feature is how much the scalar drops when the feature is ablated (set to 0):
m(clean) − m(ablated). Two estimates of it, from one forward and one backward pass:

- **Attribution patching** (activation × gradient): with the dictionary spliced in with its error
  term, a first-order Taylor expansion of m in the feature activations around the clean run gives
  m(clean) − m(ablated) ≈ Σ_pos a · ∂m/∂a, summed over the positions the feature fires at. Source:
  Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; Syed, Rager and Conmy
  2023, "Attribution Patching Outperforms Automated Circuit Discovery" (arXiv 2310.10348).
- **Direct logit attribution** of a feature at the last position: its contribution a·dᵢ to the
  residual stream read straight through the final norm, linearised by freezing its scale at the
  clean run (RMSNorm: x ↦ x·(1 + w)/rms(x), with rms(x) held fixed), onto the unembedding, and
  through the first-order change of m in the logits (and Gemma 2's soft-cap). It counts only the
  direct path, not what later layers make of the feature, so it is exact only at the last layer.
  Residual-stream hooks only (Gemma's attention and MLP outputs pass a further norm).

:func:`check_attribution` measures either estimate against the exact effect of ablating its top
features one at a time (a forward pass each). See docs/methods/feature_analysis.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from scope.analysis.features import token_strings
from scope.analysis.intervene import next_token_logprobs
from scope.analysis.splice import ablate, prompt_tokens, spliced, token_id
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.models import LoadedModel

Method = Literal["patching", "dla"]
_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass(frozen=True)
class Metric:
    """log p(target), or log p(target) − log p(other) (the logit difference), of the next token."""

    target: int
    target_token: str
    other: int | None = None
    other_token: str | None = None

    def __call__(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The scalar from next-token log-probabilities ``[vocab]``."""
        m = logprobs[self.target]
        return m - logprobs[self.other] if self.other is not None else m

    def logit_grad(self, logprobs: torch.Tensor) -> torch.Tensor:
        """∂m/∂logits ``[vocab]`` at the given distribution."""
        g = torch.zeros_like(logprobs)
        if self.other is not None:
            g[self.target], g[self.other] = 1.0, -1.0
            return g
        g[self.target] = 1.0
        return g - logprobs.exp()

    def describe(self) -> str:
        if self.other is not None:
            return f"logit({self.target_token!r}) − logit({self.other_token!r})"
        return f"log p({self.target_token!r})"


def metric_of(model: LoadedModel, target: str | int, other: str | int | None = None) -> Metric:
    """The metric log p(target), or the logit difference target − other when ``other`` is given."""
    t = token_id(model, target)
    o = token_id(model, other) if other is not None else None
    if o == t:
        raise ScopeError(f"target and other are the same token {target!r}; a logit difference needs two tokens")
    name = lambda i: model.tokenizer.decode([i])  # noqa: E731
    return Metric(t, name(t), o, name(o) if o is not None else None)


@dataclass
class FeatureScore:
    """One feature's estimated effect on the metric (and, once checked, the exact one)."""

    feature: int
    activation: float  # summed over the positions after BOS (patching) or at the last position (dla)
    estimate: float
    exact: float | None = None


@dataclass
class AttributionCheck:
    """One estimate against the exact effect of ablating each of its top features alone."""

    method: Method
    scores: list[FeatureScore]
    spearman: float  # rank correlation of estimate and exact effect over the checked features
    pearson: float
    sign_agreement: float  # fraction of features whose estimate has the exact effect's sign

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "spearman": self.spearman, "pearson": self.pearson,
                "sign_agreement": self.sign_agreement, "features": [s.__dict__ for s in self.scores]}


@dataclass
class Attribution:
    """Per feature, attribution patching (per position) and direct logit attribution (last position)."""

    text: str
    hook: str
    metric: Metric
    value: float  # the metric on the clean run
    tokens: list[str]  # with BOS at position 0
    acts: torch.Tensor = field(repr=False)  # [pos, d_sae]
    patching: torch.Tensor = field(repr=False)  # [pos, d_sae]: a · ∂m/∂a
    dla: torch.Tensor | None = field(default=None, repr=False)  # [d_sae], None off the residual stream
    checks: list[AttributionCheck] = field(default_factory=list)

    def estimates(self, method: Method = "patching") -> tuple[torch.Tensor, torch.Tensor]:
        """(estimated effect, activation) per feature ``[d_sae]``."""
        if method == "patching":  # BOS is never spliced, so it has no say (and its huge codes would mislead)
            return self.patching.sum(0), self.acts[1:].sum(0)
        if method != "dla":
            raise ScopeError(f"attribution method is 'patching' or 'dla', got {method!r}")
        if self.dla is None:
            raise ScopeError(f"direct logit attribution needs a residual-stream hook ({', '.join(_RESIDUAL)}); "
                             f"{self.hook} is not one")
        return self.dla, self.acts[-1]

    def top(self, n: int = 10, method: Method = "patching") -> list[FeatureScore]:
        """The ``n`` features with the largest |estimated effect|, largest first."""
        est, act = self.estimates(method)
        idx = est.abs().topk(min(n, est.numel())).indices.tolist()
        return [FeatureScore(i, float(act[i]), float(est[i])) for i in idx if est[i] != 0]

    def to_dict(self, n: int = 20) -> dict[str, Any]:
        """JSON-ready: the metric, its clean value and the top features of each method (and any checks)."""
        out = {"text": self.text, "hook": self.hook, "metric": self.metric.describe(), "value": self.value,
               "patching": [s.__dict__ for s in self.top(n, "patching")],
               "dla": [s.__dict__ for s in self.top(n, "dla")] if self.dla is not None else None,
               "checks": [c.to_dict() for c in self.checks]}
        return out

    def to_frame(self, n: int = 20):
        """The top ``n`` features by attribution patching, with their direct logit attribution (pandas)."""
        from scope.analysis.features import _pandas

        est = self.estimates("dla")[0] if self.dla is not None else None
        return _pandas().DataFrame([{"feature": s.feature, "activation": s.activation, "patching": s.estimate,
                                     "dla": float(est[s.feature]) if est is not None else None}
                                    for s in self.top(n)])

    def figure(self, n: int = 15):
        """Bars of the top features' attribution patching, direct logit attribution and checked exact effects."""
        import plotly.graph_objects as go

        feats = [s.feature for s in self.top(n)]
        names = [str(f) for f in feats]
        fig = go.Figure(go.Bar(x=[float(self.patching.sum(0)[f]) for f in feats], y=names, orientation="h",
                               name="attribution patching (a·∂m/∂a)"))
        if self.dla is not None:
            fig.add_trace(go.Bar(x=[float(self.dla[f]) for f in feats], y=names, orientation="h",
                                 name="direct logit attribution (last position)"))
        for c in self.checks:
            exact = {s.feature: s.exact for s in c.scores}
            fig.add_trace(go.Bar(x=[exact.get(f) for f in feats], y=names, orientation="h",
                                 name=f"exact ablation effect ({c.method} check, ρ = {c.spearman:.2f})"))
        fig.update_layout(title=f"Features of the SAE at {self.hook} driving {self.metric.describe()} after "
                                f"{self.text!r} (= {self.value:.3f})", barmode="group",
                          xaxis_title="effect on the metric: m(clean) − m(feature ablated)",
                          yaxis={"title": "feature", "type": "category", "autorange": "reversed"},
                          height=max(350, 40 * len(feats) + 150))
        return fig


@contextmanager
def _grab(model: LoadedModel, hook: str, out: dict[str, torch.Tensor]) -> Iterator[None]:
    def fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        out[hook.name] = x.detach()
        return x

    with model.bridge.hooks(fwd_hooks=[(hook, fn)]):
        yield


def _final_norm(model: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, rms) of the final norm at residual ``x [d_model]``: norm(x) = x · gain / rms."""
    norm = model.bridge.ln_final
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    rms = (x.pow(2).mean() + eps).sqrt()
    with torch.no_grad():
        y = norm(x[None]).float()[0]
        for gain in (1 + norm.weight.float(), norm.weight.float()):  # Gemma's (1 + w), or a plain weight
            if torch.allclose(x * gain / rms, y, rtol=1e-3, atol=1e-3 * float(y.abs().max())):
                return gain, rms
    raise ScopeError(f"the final norm of {model.spec} is not an RMSNorm x·g/rms(x); direct logit attribution "
                     "reads features through it")


def _direct(model: LoadedModel, sae: Dictionary, metric: Metric, logprobs: torch.Tensor, logits: torch.Tensor,
            final: torch.Tensor, x_hook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Direct logit attribution ``[d_sae]`` of the features at the last position."""
    dz = metric.logit_grad(logprobs)
    cap = model.facts.final_logit_softcap
    if cap:  # z = c·tanh(y/c): ∂z/∂y = 1 − (z/c)²
        dz = dz * (1 - (logits / cap) ** 2)
    unembed = model.hf_model.get_output_embeddings().weight.detach().float()
    gain, rms = _final_norm(model, final)
    w = (dz @ unembed) * gain / rms  # ∂m/∂(final residual), the norm's scale held fixed
    _, norms = sae.prepare(x_hook[None].to(sae.W_enc.dtype))
    with torch.enable_grad():  # the decoder is affine in the codes: one vector-Jacobian product gives dᵢ·w for all i
        c = torch.zeros(1, sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype, requires_grad=True)
        (per_unit,) = torch.autograd.grad((sae.decode(c, norms)[0].float() * w.to(c.device)).sum(), c)
    return (codes * per_unit[0].float()).detach()


def attribute(model: LoadedModel, sae: Dictionary, text: str, target: str | int, other: str | int | None = None,
              hook: str | None = None) -> Attribution:
    """Attribution patching and direct logit attribution of every feature for log p(target) (or target − other)."""
    hook = hook or sae.cfg.hook
    metric = metric_of(model, target, other)
    ids = prompt_tokens(model, text)
    grabbed: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), spliced(model, {hook: sae} if hook else sae, error_term=True) as sp, \
            _grab(model, "ln_final.hook_in", grabbed):
        logits = model.bridge(ids)[0, -1].float()
        logprobs = logits.log_softmax(-1)
        m = metric(logprobs)
        hook = next(iter(sp.acts))
        codes = sp.acts[hook]
        (grad,) = torch.autograd.grad(m, codes)
    acts = codes[0].detach().float()
    patching = (acts * grad[0].float()).cpu()
    dla = None
    if hook.endswith(_RESIDUAL):
        final = grabbed["ln_final.hook_in"][0, -1].float()
        dla = _direct(model, sae, metric, logprobs.detach(), logits.detach(), final, sp.inputs[hook][0, -1],
                      acts[-1]).cpu()
    return Attribution(text=text, hook=hook, metric=metric, value=float(m.detach()),
                       tokens=token_strings(model, ids[0].tolist()), acts=acts.cpu(), patching=patching, dla=dla)


def ablation_effects(model: LoadedModel, sae: Dictionary, text: str, metric: Metric, features: list[int],
                     positions: int | list[int] | None = None, hook: str | None = None) -> list[float]:
    """m(clean) − m(feature ablated), each feature alone, with the error term kept (a forward pass each)."""
    hook = hook or sae.cfg.hook
    saes = {hook: sae} if hook else sae
    ids = prompt_tokens(model, text)
    base = float(metric(next_token_logprobs(model, saes, ids)))
    return [base - float(metric(next_token_logprobs(model, saes, ids, [ablate(f, positions)]))) for f in features]


def check_attribution(model: LoadedModel, sae: Dictionary, attr: Attribution, n: int = 10,
                      method: Method = "patching") -> AttributionCheck:
    """Rank agreement of an estimate with the exact effect of ablating its ``n`` top features one at a time.

    Attribution patching's features are ablated at every position, direct logit attribution's at
    the last one (the only position with a direct path to the prediction). The check is kept in
    ``attr.checks`` (the figure shows it).
    """
    from scipy.stats import pearsonr, spearmanr

    if n < 2:
        raise ScopeError(f"a rank correlation needs at least 2 features, got n={n}")
    scores = attr.top(n, method)
    if len(scores) < 2:
        raise ScopeError(f"only {len(scores)} feature(s) of the SAE at {attr.hook} have a nonzero {method} estimate "
                         f"on {attr.text!r}; nothing to rank")
    exact = ablation_effects(model, sae, attr.text, attr.metric, [s.feature for s in scores],
                             positions=None if method == "patching" else -1, hook=attr.hook)
    for s, e in zip(scores, exact):
        s.exact = e
    est = np.array([s.estimate for s in scores])
    ex = np.array(exact)
    check = AttributionCheck(method=method, scores=scores, spearman=float(spearmanr(est, ex).statistic),
                             pearson=float(pearsonr(est, ex).statistic),
                             sign_agreement=float(np.mean(np.sign(est) == np.sign(ex))))
    attr.checks = [c for c in attr.checks if c.method != method] + [check]
    return check
