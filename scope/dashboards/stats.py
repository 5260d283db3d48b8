"""Feature statistics for a dashboard: one streaming pass over a store for all chosen features at once.

Per feature, over the store's rows (in store order, optionally capped): how often it fires
(code > 0), its maximum and mean activation, an exact activation histogram, the top-k activating
rows, a uniform sample of its firing rows drawn into quantile intervals, and its Pearson
correlation with every feature of the dictionary. Each kept example carries the feature's
activations over the surrounding context, taken from the pass itself; the context's tokens are
re-read afterwards from the store's token ids (:mod:`scope.dashboards.contexts`).

How each piece stays vectorised and bounded (memory does not grow with the store):

* **Top-k** and the **sample** share one structure, :class:`_Best`: per feature the K entries with the
  smallest score seen so far, kept sorted. Top-k scores a firing row by −activation; the sample scores
  it by an independent uniform key, so the K smallest keys are a uniform sample without replacement
  of the firing rows (bottom-k sampling, the streaming form of Efraimidis and Spirakis 2006, "Weighted
  random sampling with a reservoir", with equal weights). A batch's candidates are first compared with
  each feature's current worst entry, so late in a pass almost nothing needs merging.
* The **histogram** has ``bins`` equal bins over [0, hi) per feature, hi a power of two at least the
  running maximum. When a larger value arrives, pairs of bins merge and hi doubles; scaling by powers of
  two is exact in floating point, so the counts are exactly those of a histogram made after the pass.
* **Quantile intervals** are cut at bin edges from that histogram, so the share of firing rows each
  interval holds is exact; the sample's rows are sorted into them (SAEDashboard shows equal-width
  intervals of the activation range instead; quantiles keep every interval populated).
* **Density among the dictionary's features**: every feature's firing rows are counted in the same pass
  (one comparison per batch of codes), so a page can show where its feature lies among all of them.
* **Correlations** need Σ f_i f_j over rows for the chosen features against all features: the chosen
  codes go in as a sparse CSR matrix, so the cost follows the number of firings, not rows × features.
* **Contexts**: the activations of the ``left`` rows before and ``right`` rows after an example are cut
  from the codes of its batch and its neighbours (batches are processed one step behind the encoder),
  so no row is encoded twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from scope.dashboards.contexts import attach_tokens
from scope.dashboards.results import DictionaryFiring, Example, FeatureStats, Interval
from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.models import default_device
from scope.store.reader import ActivationStore


class StatsConfig(BaseModel):
    """What the pass keeps per feature; every size is per feature and independent of the store's size."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, description="top activating examples")
    intervals: int = Field(10, ge=1, description="quantile intervals of the firing activations")
    per_interval: int = Field(5, ge=0, description="examples shown per interval")
    sample: int | None = Field(None, ge=0, description="uniform sample of firing rows the intervals draw from "
                                                      "(default: 4 per example shown, at least 200)")
    left: int = Field(12, ge=0, description="context rows before an example")
    right: int = Field(4, ge=0, description="context rows after an example")
    bins: int = Field(256, ge=2, description="histogram bins over [0, hi) (a power of two)")
    correlated: int = Field(5, ge=0, description="most correlated other features (0 skips correlations)")
    max_rows: int | None = Field(None, gt=0, description="stop after this many rows of the store")
    batch_size: int | None = Field(None, gt=0, description="rows per step (default: by dictionary width)")
    seed: int = 0

    @model_validator(mode="after")
    def _default_sample(self) -> StatsConfig:
        if self.sample is None:  # the intervals draw from this sample, so it scales with what they show
            self.sample = max(200, 4 * self.intervals * self.per_interval)
        return self


class _Best:
    """Per feature, the ``k`` entries with the smallest score so far (sorted), with row, value and context."""

    def __init__(self, n: int, k: int, width: int, device: torch.device):
        self.k = k
        self.score = torch.full((n, k), float("inf"), device=device)
        self.row = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((n, k), device=device)
        self.ctx = torch.zeros((n, k, width), device=device)

    def push(self, feat: torch.Tensor, score: torch.Tensor, row: torch.Tensor, value: torch.Tensor,
             context) -> None:
        """Offer candidates (feature, score, row, value); ``context(mask)`` gives the kept ones' contexts."""
        if self.k == 0:
            return
        keep = score < self.score[feat, -1]
        if not bool(keep.any()):
            return
        feat, score, row, value, ctx = feat[keep], score[keep], row[keep], value[keep], context(keep)
        u, group = torch.unique(feat, return_inverse=True)
        k, n = self.k, len(u)
        s = torch.cat([self.score[u].reshape(-1), score])
        g = torch.cat([torch.arange(n, device=s.device).repeat_interleave(k), group])
        order = s.argsort(stable=True)
        order = order[g[order].argsort(stable=True)]  # by group, then score; old entries first on ties
        sizes = torch.bincount(g, minlength=n)
        rank = torch.arange(len(order), device=s.device) - (torch.cumsum(sizes, 0) - sizes)[g[order]]
        take = order[rank < k]  # every group holds at least its k old entries, so exactly k each
        self.score[u] = s[take].view(n, k)
        self.row[u] = torch.cat([self.row[u].reshape(-1), row])[take].view(n, k)
        self.value[u] = torch.cat([self.value[u].reshape(-1), value])[take].view(n, k)
        self.ctx[u] = torch.cat([self.ctx[u].reshape(-1, self.ctx.shape[-1]), ctx])[take].view(n, k, -1)


_MASK53 = (1 << 53) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (wrapping products; shifts made logical by masking)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sample_key(feature: torch.Tensor, row: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform [0, 1) key per (feature, row), a hash of both and the seed.

    Keys come from a hash rather than a random stream, so a feature's sample is the same whichever
    other features share the pass and whatever the batch size.
    """
    x = _mix(row.long() * -7046029254386353131 + _mix(feature.long() + seed * 1_000_003))  # 0x9E3779B97F4A7C15
    return (((x >> 11) & _MASK53).double() / float(1 << 53)).float()


class _Histogram:
    """Exact per-feature histograms with ``bins`` equal bins over [0, hi), hi a power of two ≥ the maximum."""

    def __init__(self, n: int, bins: int, device: torch.device):
        if bins & (bins - 1):
            raise ScopeError(f"histogram bins must be a power of two, got {bins}")
        self.bins = bins
        self.counts = torch.zeros((n, bins), dtype=torch.long, device=device)
        self.hi = torch.zeros(n, device=device)

    def add(self, feat: torch.Tensor, value: torch.Tensor, batch_max: torch.Tensor) -> None:
        grow = batch_max > self.hi
        if bool(grow.any()):
            idx = grow.nonzero().squeeze(1)
            new = torch.exp2(torch.ceil(torch.log2(batch_max[idx])))
            new = torch.where(new < batch_max[idx], new * 2, new)  # hi ≥ max even where log2 rounds down
            fresh = self.hi[idx] == 0
            self.hi[idx[fresh]] = new[fresh]
            old = idx[~fresh]
            steps = torch.round(torch.log2(new[~fresh] / self.hi[old])).long()
            for step in range(1, int(steps.max()) + 1 if len(steps) else 1):
                f = old[steps >= step]
                halves = self.counts[f].view(len(f), self.bins // 2, 2).sum(-1)
                self.counts[f] = torch.cat([halves, torch.zeros_like(halves)], 1)
                self.hi[f] *= 2
        self.counts.view(-1).index_add_(0, feat * self.bins + self.bin_of(feat, value),
                                        torch.ones_like(feat))

    def bin_of(self, feat: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Bin of each (feature, value) pair; exact, since hi is a power of two."""
        return (value / self.hi[feat] * self.bins).long().clamp_(0, self.bins - 1)


class _Pass:
    """The accumulators of one pass over ``n`` chosen features of an ``m``-wide dictionary."""

    def __init__(self, features: torch.Tensor, m: int, cfg: StatsConfig, device: torch.device):
        n, width = len(features), cfg.left + 1 + cfg.right
        self.cfg, self.features, self.device = cfg, features, device
        self.rows = 0
        self.fired_all = torch.zeros(m, dtype=torch.long, device=device)
        self.count = torch.zeros(n, dtype=torch.long, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, device=device)
        self.hist = _Histogram(n, cfg.bins, device)
        self.top = _Best(n, cfg.top_k, width, device)
        self.sample = _Best(n, cfg.sample, width, device)
        self.corr = cfg.correlated > 0
        if self.corr:
            self.sum_all = torch.zeros(m, dtype=torch.float64, device=device)
            self.sq_all = torch.zeros(m, dtype=torch.float64, device=device)
            self.cross = torch.zeros((n, m), device=device)

    def observe(self, codes_all: torch.Tensor, codes: torch.Tensor) -> None:
        """Counts, sums, maxima, histograms and co-activations of one batch (no context needed).

        ``codes_all`` (every feature) is clamped in place; ``codes`` (the chosen ones) is not touched.
        """
        codes = codes.clamp_min(0)
        self.fired_all += (codes_all > 0).sum(0)
        r, f = codes.nonzero(as_tuple=True)
        v = codes[r, f]
        self.count += torch.bincount(f, minlength=len(self.features))
        self.total.index_add_(0, f, v.double())
        batch_max = codes.amax(0)
        self.max = torch.maximum(self.max, batch_max)
        self.hist.add(f, v, batch_max)
        if self.corr:
            pos = codes_all.clamp_min_(0)  # the caller is done with codes_all
            self.sum_all += pos.sum(0)  # one batch sums well in float32; the running totals are float64
            self.sq_all += (pos * pos).sum(0)
            with warnings.catch_warnings():  # "sparse CSR support is in beta" on every call
                warnings.simplefilter("ignore", UserWarning)
                self.cross += codes.T.contiguous().to_sparse_csr() @ pos
        self.rows += codes.shape[0]

    def choose(self, window: torch.Tensor, start: int, n_rows: int) -> None:
        """Offer one batch's firing rows to top-k and to the sample; ``window`` is the batch's codes with
        ``left`` rows of the previous batch before and ``right`` of the next after."""
        cfg = self.cfg
        codes = window[cfg.left : cfg.left + n_rows]
        r, f = (codes > 0).nonzero(as_tuple=True)
        v = codes[r, f]
        span = torch.arange(cfg.left + 1 + cfg.right, device=codes.device)

        def context(mask: torch.Tensor) -> torch.Tensor:
            return window[r[mask, None] + span, f[mask, None]]

        self.top.push(f, -v, r + start, v, context)
        if cfg.sample:
            self.sample.push(f, sample_key(self.features[f], r + start, cfg.seed), r + start, v, context)

    def correlations(self, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``correlated`` highest Pearson r of each chosen feature with every other feature."""
        if not self.corr or self.rows < 2:
            return None
        n = self.rows
        mean = self.sum_all / n
        std = (self.sq_all / n - mean**2).clamp_min(0).sqrt()
        k = min(self.cfg.correlated, len(mean) - 1)
        idx, val = [], []
        for a in range(0, len(self.features), chunk):  # [chunk × width] float64 at a time, not the whole matrix
            fi = self.features[a : a + chunk].to(self.device)
            cov = self.cross[a : a + chunk].double() / n - mean[fi, None] * mean[None, :]
            r = torch.nan_to_num(cov / (std[fi, None] * std[None, :]), nan=-2.0, posinf=-2.0, neginf=-2.0)
            r[torch.arange(len(fi), device=self.device), fi] = -2.0  # not itself
            top = r.topk(k, dim=1)
            idx.append(top.indices.cpu())
            val.append(top.values.float().cpu())
        return torch.cat(idx), torch.cat(val)


def parse_features(spec: str | Sequence[int] | None, d_sae: int) -> list[int]:
    """Feature indices from ``0:500``, ``7``, ``1,5,9`` or ``0:10,100:110`` (Python slices); all when None."""
    if spec is None:
        return list(range(d_sae))
    picked: list[int] = []
    for part in spec.split(",") if isinstance(spec, str) else spec:
        if isinstance(part, str) and ":" in part:
            a, _, b = part.partition(":")
            lo, hi = _index(a, spec, 0), _index(b, spec, d_sae)
            if lo >= hi:
                raise ScopeError(f"feature range {part.strip()!r} is empty; write START:STOP with START < STOP")
            if hi > d_sae:
                raise ScopeError(f"feature range {part.strip()!r} reaches past the dictionary's {d_sae} features "
                                 f"(valid: 0:{d_sae})")
            picked += range(lo, hi)
        else:
            picked.append(_index(part, spec, None))
    bad = [i for i in picked if not 0 <= i < d_sae]
    if bad:
        raise ScopeError(f"features {bad[:5]} are out of range for a dictionary with {d_sae} features "
                         f"(valid: 0 … {d_sae - 1})")
    if not picked:
        raise ScopeError("no features chosen")
    return sorted(set(picked))


def _index(text, spec, default: int | None) -> int:
    if isinstance(text, str) and not text.strip() and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ScopeError(f"cannot read features {spec!r}: use START:STOP, single indices or a comma list of them, "
                         f"e.g. 0:500 or 3,17,42") from None


def dictionary_hook(sae: Dictionary, store: ActivationStore, hook: str | None = None, force: bool = False) -> str:
    """The store hook a dictionary reads: its own, else the only one of its width; ``hook`` other than its own
    only with ``force``."""
    d, own = sae.cfg.d_in, sae.cfg.hook
    force_flag = " --force-hook" if own is not None else ""
    if hook is None:
        if own in store.hooks:
            hook = own
        else:
            fits = [h for h in store.hooks if store.width(h) == d]
            if not fits:
                raise ScopeError(f"store {store.url!r} holds no hook of the dictionary's width d_in {d} (its hooks: "
                                 f"{', '.join(f'{h} width {store.width(h)}' for h in store.hooks)}); use a store "
                                 f"captured at {own or 'the hook the dictionary was trained on'}")
            if len(fits) > 1:
                raise ScopeError(f"store {store.url!r} does not hold the dictionary's hook {own!r}, and several of its "
                                 f"hooks have its width d_in {d}; pass one of them: "
                                 + " or ".join(f"--hook {h}{force_flag}" for h in fits))
            hook = fits[0]
    elif own is not None and hook != own and not force:
        store.check_hook(hook)
        raise ScopeError(f"--hook {hook} is not the dictionary's own hook {own}; leave --hook out (or pass --hook "
                         f"{own}) to read its own, or add --force-hook to read {hook} on purpose")
    width = store.width(store.check_hook(hook))
    if width != d:
        raise ScopeError(f"dictionary width d_in {d} does not match hook {hook!r} of store {store.url!r} "
                         f"(width {width}); use a dictionary trained on that hook")
    return hook


@torch.no_grad()
def feature_stats(sae: Dictionary, store: ActivationStore, features: Sequence[int] | None = None,
                  hook: str | None = None, cfg: StatsConfig | None = None,
                  device: str | torch.device | None = None, progress: bool = True,
                  force_hook: bool = False) -> list[FeatureStats]:
    """Statistics of ``features`` (default: all) over ``store`` in one pass, with every example's context."""
    cfg = cfg or StatsConfig()
    hook = dictionary_hook(sae, store, hook, force_hook)
    m = sae.cfg.d_sae
    chosen = parse_features(features, m)
    dev = default_device(device) if device is not None else next(sae.parameters()).device
    sae = sae.to(dev).eval()
    feats = torch.tensor(chosen, device=dev)
    total = len(store) if cfg.max_rows is None else min(len(store), cfg.max_rows)
    if total == 0:
        raise ScopeError(f"store {store.url!r} has no rows in this view")
    batch = max(cfg.batch_size or max(256, min(4096, (1 << 24) // max(m, len(chosen)))), cfg.left + cfg.right + 1)
    acc = _Pass(feats, m, cfg, dev)
    width = cfg.left + 1 + cfg.right
    tail = torch.zeros((cfg.left, len(chosen)), device=dev)
    pending: tuple[torch.Tensor, int] | None = None  # a batch whose successor has not been encoded yet
    bar = tqdm(total=total, desc="dashboard pass", unit="row", disable=not progress, dynamic_ncols=True)
    seen = 0
    for b in store.rows([hook], batch_size=batch, shuffle=False, dtype=torch.float32, device=dev):
        x = b.acts[hook].reshape(len(b.token_id), -1)[: total - seen]
        codes_all = sae.encode(x).float()
        codes = codes_all[:, feats]
        acc.observe(codes_all, codes)
        if pending is not None:
            tail = _step(acc, tail, pending, codes[: cfg.right], width)
        pending = (codes, seen)
        seen += len(x)
        bar.update(len(x))
        if seen >= total:
            break
    bar.close()
    if pending is not None:
        _step(acc, tail, pending, codes[:0], width)
    stats = _summarise(acc, chosen, cfg)
    attach_tokens(store, stats, total)
    return stats


def _step(acc: _Pass, tail: torch.Tensor, pending: tuple[torch.Tensor, int], head: torch.Tensor,
          width: int) -> torch.Tensor:
    """Offer the pending batch's rows, with its neighbours' edges as context; return the next tail."""
    codes, start = pending
    right = width - 1 - tail.shape[0]
    head = torch.cat([head, head.new_zeros((right - len(head), head.shape[1]))])
    acc.choose(torch.cat([tail, codes, head]), start, len(codes))
    left = tail.shape[0]
    return torch.cat([tail, codes])[-left:] if left else tail


def _summarise(acc: _Pass, chosen: list[int], cfg: StatsConfig) -> list[FeatureStats]:
    """Per-feature results from the accumulators: histograms, quantile intervals, examples."""
    hist = acc.hist
    counts, hi = hist.counts.cpu(), hist.hi.cpu()
    count, total, mx = acc.count.cpu(), acc.total.cpu(), acc.max.cpu()
    corr = acc.correlations()
    firing = DictionaryFiring(acc.rows, acc.fired_all.cpu().tolist())
    top = _examples(acc.top, cfg)
    sample = _examples(acc.sample, cfg)
    owner = [i for i, s in enumerate(sample) for _ in s]  # every sampled example's bin in one device call
    flat = hist.bin_of(torch.tensor(owner, dtype=torch.long, device=hist.hi.device),
                       torch.tensor([e.value for s in sample for e in s], device=hist.hi.device)).cpu().tolist()
    sample_bins: dict[int, list[int]] = {}
    for i, b in zip(owner, flat):
        sample_bins.setdefault(i, []).append(b)
    out = []
    for i, f in enumerate(chosen):
        n_fire = int(count[i])
        edges_bins = _quantile_bins(counts[i], cfg.intervals) if n_fire else []
        step = float(hi[i]) / hist.bins
        intervals = []
        for a, b in zip(edges_bins[:-1], edges_bins[1:]):
            inside = [e for e, j in zip(sample[i], sample_bins.get(i, [])) if a <= j < b]
            intervals.append(Interval(lo=a * step, hi=min(b * step, float(mx[i])),
                                      contains=int(counts[i, a:b].sum()) / n_fire,
                                      examples=inside[: cfg.per_interval]))
        last = int(counts[i].nonzero().max()) + 1 if n_fire else 0
        out.append(FeatureStats(
            feature=f, rows=acc.rows, count=n_fire, max=float(mx[i]) + 0.0,  # + 0.0: no -0.0
            mean=float(total[i]) / n_fire if n_fire else 0.0,
            hist_edges=[j * step for j in range(last + 1)], hist_counts=counts[i, :last].tolist(),
            top=top[i], intervals=intervals,
            correlated=[] if corr is None else [(int(j), float(r)) for j, r in zip(corr[0][i], corr[1][i]) if r > -1.5],
            dictionary=firing,
        ))
    return out


def _quantile_bins(counts: torch.Tensor, intervals: int) -> list[int]:
    """Bin edges (as bin indices) cutting the firing rows into ``intervals`` near-equal shares."""
    cdf = torch.cumsum(counts, 0)
    n = int(cdf[-1])
    first, last = int(counts.nonzero().min()), int(counts.nonzero().max()) + 1
    cuts = [int(torch.searchsorted(cdf, n * q / intervals, right=False)) + 1 for q in range(1, intervals)]
    return sorted({first, *[c for c in cuts if first < c < last], last})


def _examples(best: _Best, cfg: StatsConfig) -> list[list[Example]]:
    """Each feature's kept entries (in score order) as examples with their context activations."""
    rows, values, ctx = best.row.cpu(), best.value.cpu(), best.ctx.cpu()
    offsets = list(range(-cfg.left, cfg.right + 1))
    out = []
    for i in range(rows.shape[0]):
        keep = rows[i] >= 0
        out.append([Example(row=int(r), value=float(v), offsets=offsets, values=c.tolist(), tokens=[])
                    for r, v, c in zip(rows[i][keep], values[i][keep], ctx[i][keep])])
    return out
