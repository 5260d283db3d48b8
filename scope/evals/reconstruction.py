"""Reconstruction metrics of a dictionary over a store, streamed in bounded memory.

L0, fraction of variance unexplained (mean-centred and uncentred), cosine similarity, MSE and
per-latent firing frequencies (dead and dense latents), as defined in docs/methods/evaluation.md.
Sources: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093): MSE
normalised by the inputs' variance; Lieberum et al. 2024, "Gemma Scope" (arXiv 2408.05147): L0,
FVU, and high-frequency latents (firing on more than 10% of tokens) as standard SAE metrics. A transcoder
(dictionaries/transcoder.py) is scored on the site it writes: FVU, cosine and MSE of its output ŷ against the
output hook's activations, its codes (L0, dead and dense latents) computed from the input hook's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.store.reader import ActivationStore

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of rows is "dense", as in Gemma Scope


@dataclass
class ReconstructionMetrics:
    """How well a dictionary reconstructs a store's activations, and how its latents fire."""

    hook: str  # the hook reconstructed (a transcoder's output hook)
    rows: int
    l0: float  # mean number of active latents per row
    fvu: float  # Σ‖x − x̂‖² / Σ‖x − mean(x)‖²
    fvu_uncentred: float  # Σ‖x − x̂‖² / Σ‖x‖²
    cosine: float  # mean over rows of cos(x, x̂)
    mse: float  # Σ‖x − x̂‖² / (rows · d_in), per element
    dead: int  # latents that never fired on the evaluated rows
    dead_fraction: float
    dense: int  # latents firing on more than ``dense_threshold`` of rows
    dense_fraction: float
    dense_threshold: float
    firing_frequency: torch.Tensor = field(repr=False)  # [d_sae], fraction of rows each latent fired on
    input_hook: str | None = None  # the hook the codes are computed from (the same as ``hook`` for an SAE)

    def to_dict(self, frequencies: bool = False) -> dict[str, Any]:
        """JSON-ready figures; the per-latent firing frequencies only when asked (d_sae floats)."""
        out = asdict(self)
        freq = out.pop("firing_frequency")
        if frequencies:
            out["firing_frequency"] = freq.tolist()
        return out


class _Accumulator:
    """Running sums for the metrics, in float64 so 1e5+ rows of norm ~1e4 lose nothing."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.mean: torch.Tensor | None = None  # running mean of x, [d_in]
        self.m2 = 0.0  # Σ‖x − mean‖², merged batch by batch (Chan et al.'s parallel variance)
        self.sq = 0.0  # Σ‖x‖²
        self.err = 0.0  # Σ‖x − x̂‖²
        self.cos = 0.0  # Σ cos(x, x̂)
        self.active = 0.0  # Σ L0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        n_b = x.shape[0]
        xd = x.double()
        mean_b = xd.mean(0)
        m2_b = float((xd - mean_b).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            # Merging centred sums avoids Σ‖x‖² − N‖μ‖², which cancels catastrophically when the
            # mean is large (Gemma's massive activations).
            n = self.n + n_b
            delta = mean_b - self.mean
            self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n_b / n
            self.mean = self.mean + delta * (n_b / n)
        self.n += n_b
        self.sq += float(xd.pow(2).sum())
        self.err += float((xd - x_hat.double()).pow(2).sum())
        # A zero reconstruction (or a zero input) has no direction; count its cosine as 0.
        self.cos += float(torch.nn.functional.cosine_similarity(xd, x_hat.double(), dim=-1, eps=1e-12).sum())
        on = codes != 0
        self.active += float(on.sum())
        self.fired += on.sum(0).double().cpu()


def resolve_hook(sae: Dictionary, store: ActivationStore, hook: str | None = None) -> str:
    """The hook to evaluate at: the given one, else the SAE's, else the store's only hook."""
    hook = hook or sae.cfg.hook
    if hook is None:
        if len(store.hooks) != 1:
            raise ScopeError(f"the SAE does not name its hook and store {store.url!r} holds several "
                             f"({sorted(store.hooks)}); pass hook=")
        hook = next(iter(store.hooks))
    store.check_hook(hook)
    width = store.width(hook)
    if width != sae.cfg.d_in:
        raise ScopeError(f"the SAE reads width d_in {sae.cfg.d_in}, but hook {hook!r} of store {store.url!r} has width "
                         f"{width}; pass a store captured from the SAE's model and hook, or an SAE trained on this one")
    return hook


def resolve_output_hook(sae: Dictionary, store: ActivationStore, hook: str) -> str:
    """The hook whose activations the reconstruction is compared with: a transcoder's output hook, which the
    store must hold; for an SAE, ``hook`` (the one it reads)."""
    out = sae.output_hook if sae.output_hook != sae.cfg.hook else None
    if out is None:
        return hook
    if out not in store.hooks:
        raise ScopeError(f"the transcoder writes {out!r}, but store {store.url!r} holds only {sorted(store.hooks)}; "
                         f"evaluate it on a store captured with both {hook} and {out}")
    width, d_out = store.width(out), sae.W_dec.shape[1]
    if width != d_out:
        raise ScopeError(f"store {out} has width {width} but the transcoder writes {d_out}")
    return out


def _device(sae: Dictionary, device: str | torch.device | None) -> torch.device:
    if device is not None:
        sae.to(device)
    return sae.W_enc.device


@torch.inference_mode()
def reconstruction_metrics(
    sae: Dictionary,
    store: ActivationStore,
    hook: str | None = None,
    max_rows: int | None = None,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
) -> ReconstructionMetrics:
    """L0, FVU, cosine, MSE and dead/dense latents of ``sae`` over ``store`` (e.g. its held-out split).

    FVU is mean-centred: the residual error over the inputs' total variance, so a dictionary that
    outputs the mean has FVU 1. On Gemma the residual stream carries massive activations (a few
    dimensions with means in the thousands, see docs/methods/evaluation.md): the uncentred variant
    Σ‖x − x̂‖²/Σ‖x‖² is then tiny for any decoder bias near the mean, and even the centred one can
    look good while the spliced-in language-model loss suffers. Judge by delta loss (lm_loss.py).

    Rows are streamed in batches, so memory stays bounded by one batch plus O(d_in + d_sae).
    With ``max_rows`` the rows are drawn shuffled (a bounded buffer) so the cap spans the store.
    ``device`` moves ``sae`` there (in place); by default it stays where it is.
    """
    hook = resolve_hook(sae, store, hook)
    out_hook = resolve_output_hook(sae, store, hook)
    if max_rows is not None and max_rows <= 0:
        raise ScopeError(f"max_rows must be positive, got {max_rows}")
    if not 0 < dense_threshold <= 1:
        raise ScopeError(f"dense_threshold must be a fraction in (0, 1], got {dense_threshold}")
    dev = _device(sae, device)
    acc = _Accumulator(sae.cfg.d_sae)
    shuffle = max_rows is not None
    hooks = list(dict.fromkeys([hook, out_hook]))
    batches = store.rows(hooks, batch_size=batch_size, shuffle=shuffle, buffer_rows=max(batch_size, 1 << 15),
                         dtype=sae.W_enc.dtype, device=dev)
    for b in batches:
        x, y = (b.acts[h].reshape(b.acts[h].shape[0], -1) for h in (hook, out_hook))
        if max_rows is not None:
            x, y = x[: max_rows - acc.n], y[: max_rows - acc.n]
        codes, y_hat = sae.reconstruct(x)
        acc.add(y, y_hat, codes)
        if max_rows is not None and acc.n >= max_rows:
            break
    if acc.n == 0:
        raise ScopeError(f"store {store.url!r} has no rows in this view (an empty split?); nothing to evaluate")
    freq = (acc.fired / acc.n).float()
    d_sae = sae.cfg.d_sae
    dead, dense = int((acc.fired == 0).sum()), int((freq > dense_threshold).sum())
    return ReconstructionMetrics(
        hook=out_hook, input_hook=hook, rows=acc.n, l0=acc.active / acc.n,
        fvu=acc.err / acc.m2 if acc.m2 > 0 else float("nan"),
        fvu_uncentred=acc.err / acc.sq if acc.sq > 0 else float("nan"),
        cosine=acc.cos / acc.n, mse=acc.err / (acc.n * sae.W_dec.shape[1]),
        dead=dead, dead_fraction=dead / d_sae, dense=dense, dense_fraction=dense / d_sae,
        dense_threshold=dense_threshold, firing_frequency=freq,
    )
