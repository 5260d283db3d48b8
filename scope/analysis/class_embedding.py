"""Class-embedding projections: intermediate representations read in the space of the classes.

A representation h (the residual stream after a block, or an attention or MLP output) is sent
through the model's final norm and onto a class-embedding matrix E: for a language model the
unembedding (the logit lens; Gemma 2's final soft-cap applied), or the rows of a set of label
words; for a vision classifier its head. Per token, the rank r of the true class among the
projected logits gives the class identifiability score s = 1 − r/|C| (1: top-1, about 0.5:
chance). Ties count half: r = #(classes above) + #(other classes tied) / 2.

Source: Vilas, Schaumlöffel and Roig, "Analyzing Vision Transformers for Image Classification in
Class Embedding Space" (NeurIPS 2023): §3 (projection through the final norm onto the class
embeddings; identifiability score; % of identifiable tokens; change rate between blocks), §4
(key-value memories of the MLPs and their agreement with the class); nostalgebraist (2020),
"interpreting GPT: the logit lens", for language models. See docs/methods/class_embedding.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from scope.errors import ScopeError

Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ClassSpace:
    """How a representation reaches class logits: final norm, class embeddings ``[C, d]``, bias, soft-cap."""

    norm: Norm
    embedding: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    classes: list[str] | None = None

    @property
    def n_classes(self) -> int:
        return self.embedding.shape[0]

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Class logits ``[..., C]`` of representations ``[..., d]``."""
        if h.shape[-1] != self.embedding.shape[1]:
            raise ScopeError(f"representation width {h.shape[-1]} does not match the class embeddings' "
                             f"{self.embedding.shape[1]}")
        z = self.norm(h.to(self.embedding.dtype)) @ self.embedding.T
        if self.bias is not None:
            z = z + self.bias
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def identifiability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class identifiability s = 1 − r/|C| per row, with r the tie-averaged rank of the target (0 = top)."""
    true = logits.gather(-1, target[..., None])
    above = (logits > true).sum(-1)
    ties = (logits == true).sum(-1) - 1
    return 1.0 - (above.double() + 0.5 * ties.double()) / logits.shape[-1]


# --- accumulating the per-site metrics ----------------------------------------------------------
@dataclass
class SiteMetrics:
    """Identifiability of the true class at one site, over all scored tokens."""

    site: str
    mean_score: float
    identifiable_pct: float  # tokens with s = 1 (the true class on top)
    inputs_pct: float  # inputs (windows, documents, images) with at least one identifiable token
    change_rate_pct: float | None  # tokens whose true-class logit rose from the previous residual site


@dataclass
class Identifiability:
    """Per-site class identifiability of one model on one set of inputs."""

    mode: str  # "next-token", "labels" or "image"
    n_classes: int
    tokens: int
    inputs: int
    sites: list[SiteMetrics]
    readout: list[float] | None = None  # labels mode: mean s at each input's last position, per site

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def column(self, name: str) -> list[float | None]:
        return [getattr(s, name) for s in self.sites]


@dataclass
class _Accumulator:
    """Running sums per site; ``chain`` names the residual sites whose consecutive logits are compared."""

    sites: list[str]
    chain: list[str]
    n_inputs: int
    sums: dict[str, float] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)
    rises: dict[str, int] = field(default_factory=dict)
    hit: dict[str, torch.Tensor] = field(default_factory=dict)
    readout: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    readouts: int = 0

    def __post_init__(self) -> None:
        for s in self.sites:
            self.sums[s], self.top[s], self.rises[s], self.readout[s] = 0.0, 0, 0, 0.0
            self.hit[s] = torch.zeros(self.n_inputs, dtype=torch.bool)

    def add(self, space: ClassSpace, reps: dict[str, torch.Tensor], target: torch.Tensor, input_id: torch.Tensor,
            last: torch.Tensor | None = None, chunk: int = 512) -> None:
        """Score rows ``[N, d]`` per site against ``target`` [N]; ``last`` marks each input's readout row."""
        n = len(target)
        self.tokens += n
        if last is not None:
            self.readouts += int(last.sum())
        for a in range(0, n, chunk):  # bounded memory: at most chunk × |C| logits at a time
            sl = slice(a, min(a + chunk, n))
            t, ids = target[sl], input_id[sl]
            prev_true = None
            for site in self.sites:
                z = space.logits(reps[site][sl])
                s = identifiability(z, t.to(z.device)).cpu()
                self.sums[site] += float(s.sum())
                top = s == 1.0
                self.top[site] += int(top.sum())
                self.hit[site][ids[top]] = True
                if last is not None:
                    self.readout[site] += float(s[last[sl]].sum())
                if site in self.chain:
                    true = z.gather(-1, t.to(z.device)[:, None]).squeeze(-1)
                    if prev_true is not None:
                        self.rises[site] += int((true > prev_true).sum())
                    prev_true = true

    def result(self, mode: str, n_classes: int) -> Identifiability:
        if self.tokens == 0:
            raise ScopeError("no tokens were scored: the inputs were empty or held only BOS")
        sites = [SiteMetrics(site=s, mean_score=self.sums[s] / self.tokens, identifiable_pct=100 * self.top[s] / self.tokens,
                             inputs_pct=100 * float(self.hit[s].float().mean()),
                             change_rate_pct=100 * self.rises[s] / self.tokens if s in self.chain[1:] else None)
                 for s in self.sites]
        readout = [self.readout[s] / self.readouts for s in self.sites] if self.readouts else None
        return Identifiability(mode=mode, n_classes=n_classes, tokens=self.tokens, inputs=self.n_inputs, sites=sites,
                               readout=readout)


def score_sites(space: ClassSpace, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                                                          torch.Tensor | None]],
                sites: Sequence[str], chain: Sequence[str], n_inputs: int, mode: str) -> Identifiability:
    """Identifiability per site from batches of (representations per site, targets, input ids, readout mask)."""
    acc = _Accumulator(list(sites), list(chain), n_inputs)
    for reps, target, ids, last in batches:
        acc.add(space, reps, target, ids, last)
    return acc.result(mode, space.n_classes)


# --- value vectors and dictionary directions ----------------------------------------------------
@dataclass
class DirectionClasses:
    """For each direction, the classes it most raises and most lowers, with their logits."""

    top_ids: torch.Tensor  # [n, k]
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor
    hist_edges: list[list[float]] | None = None  # per direction: equal bins, on round numbers, over all its logits
    hist_counts: list[list[int]] | None = None  # per direction: classes per bin

    def named(self, i: int, names: Callable[[list[int]], list[str]]) -> dict[str, Any]:
        """Direction ``i`` with class names from ``names`` (e.g. the tokenizer's decode per id)."""
        out = {"top": list(zip(names(self.top_ids[i].tolist()), self.top_logits[i].tolist())),
               "bottom": list(zip(names(self.bottom_ids[i].tolist()), self.bottom_logits[i].tolist()))}
        if self.hist_counts is not None:
            out["histogram"] = {"edges": self.hist_edges[i], "counts": self.hist_counts[i]}
        return out


@torch.no_grad()
def direction_classes(space: ClassSpace, directions: torch.Tensor, k: int = 10, chunk: int = 64,
                      bins: int = 0) -> DirectionClasses:
    """Top and bottom ``k`` classes of each direction ``[n, d]`` (value vectors, decoder rows) through the final norm;
    with ``bins``, also a histogram of its logits over every class.

    Every product has the same shape, ``chunk`` rows (the last chunk padded with zeros): a BLAS picks its kernel by
    shape, and a direction's logits moved in their last bits with the number of rows beside it, enough to move a
    logit across a histogram edge, so a feature's dashboard depended on which features were published with it."""
    if directions.ndim != 2:
        raise ScopeError(f"directions must be a matrix [n, d], got shape {tuple(directions.shape)}")
    k = min(k, space.n_classes)
    parts, edges, counts = [], [], []
    for a in range(0, len(directions), chunk):
        # A direction carries no bias, and the soft-cap is monotone: rank by the embedding alone.
        d = directions[a : a + chunk].to(space.embedding.device, space.embedding.dtype)
        n = len(d)
        d = torch.cat([d, d.new_zeros(chunk - n, d.shape[1])]) if n < chunk else d
        z = (space.norm(d) @ space.embedding.T)[:n]
        top, bot = z.topk(k, -1), z.topk(k, -1, largest=False)
        parts.append((top.indices.cpu(), top.values.float().cpu(), bot.indices.cpu(), bot.values.float().cpu()))
        if bins:
            e, c = _row_histograms(z, bins)
            edges += e
            counts += c
    return DirectionClasses(*(torch.cat(p) for p in zip(*parts)), *((edges, counts) if bins else ()))


def _row_histograms(z: torch.Tensor, bins: int) -> tuple[list[list[float]], list[list[int]]]:
    """Edges and counts of a histogram of each row of ``z`` in about ``bins`` bins of a round width (1, 2 or 5
    times a power of ten) starting at a multiple of it.

    Round edges read well on an axis.
    """
    z = z.double()
    lo, hi = z.amin(-1), z.amax(-1)
    raw = ((hi - lo) / bins).clamp_min(1e-12)
    power = torch.pow(10.0, torch.floor(torch.log10(raw)))
    step = power * torch.where(raw <= power, 1.0, torch.where(raw <= 2 * power, 2.0, torch.where(raw <= 5 * power, 5.0, 10.0)))
    first = torch.floor(lo / step)
    which = torch.floor(z / step[:, None] - first[:, None]).long()
    n = which.amax(-1) + 1
    full = torch.zeros((len(z), int(n.max())), dtype=torch.long, device=z.device)
    full.scatter_add_(1, which, torch.ones_like(which))
    edges = [((f + torch.arange(int(m) + 1, dtype=torch.float64)) * s).tolist()
             for f, m, s in zip(first.cpu(), n.cpu(), step.cpu())]
    return edges, [row[: int(m)].tolist() for row, m in zip(full.cpu(), n.cpu())]


def memory_agreement(activations: torch.Tensor, memory_top: torch.Tensor, target: torch.Tensor,
                     value_norms: torch.Tensor | None = None, k: int = 10) -> float:
    """Share of (token, memory) pairs, over each token's ``k`` most activated memories, whose top
    classes include the token's true class.

    ``activations`` ``[N, m]`` are the memory coefficients (the MLP's hidden activations),
    ``memory_top`` ``[m, t]`` each memory's top classes, ``target`` ``[N]``. Memories are ranked by
    their contribution a_i·‖v_i‖ when ``value_norms`` are given.
    """
    score = activations * value_norms if value_norms is not None else activations
    chosen = score.topk(min(k, score.shape[1]), -1).indices  # [N, k]
    tops = memory_top.to(chosen.device)[chosen]  # [N, k, t]
    return float((tops == target.to(chosen.device)[:, None, None]).any(-1).float().mean())
