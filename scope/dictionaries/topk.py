"""TopK, BatchTopK and statistical top-k SAEs, with the AuxK loss against dead latents (dictionaries/auxk.py).

Sources: Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093), Sec. 2.3
(TopK activation) and Appendix A.2 (AuxK: the residual error is reconstructed from the top k_aux
dead latents, weighted 1/32); Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"
(arXiv 2412.06410): the top k·B pre-activations over a whole batch, and at inference a single
threshold estimated during training; You et al. 2025, "Spark Transformer" (arXiv 2506.06644),
statistical top-k: per row, keep entries above mean + std · Φ⁻¹(1 − k/M) of the row's
pre-activations, which needs no sort and runs in linear time (exact when pre-activations are
Gaussian). ``matryoshka_widths`` adds the Matryoshka loss (scope/dictionaries/matryoshka.py); a
BatchTopK SAE infers with one threshold, so :meth:`TopK.as_jumprelu` turns it into the JumpReLU SAE
it is at inference, as SAELens saves its (Matryoshka) BatchTopK SAEs.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from scope.dictionaries.auxk import Gather, aux_loss
from scope.dictionaries.base import Dictionary, DictionaryConfig, build
from scope.dictionaries.losses import LossParts
from scope.dictionaries.matryoshka import dense_reconstruction, prefix_ends, sparse_reconstruction
from scope.dictionaries.sparse import GatheredPre, pairs


class TopKConfig(DictionaryConfig):
    kind: Literal["topk"] = "topk"
    k: int = Field(gt=0)
    selection: Literal["exact", "batch", "statistical"] = "exact"
    apply_b_dec_to_input: bool = True
    aux_k: int | None = None  # default: d_in // 2, as in Gao et al.
    aux_coeff: float = 1 / 32
    # AuxK's gradient reaches b_dec through the centred encoder input, as in Gao et al. and SAELens. False: it
    # moves only the dead latents' encoder and decoder, as a JumpReLU's AuxK does (jumprelu.py).
    aux_b_dec: bool = True
    dead_after_tokens: int = 1_000_000
    matryoshka_widths: list[int] | None = None  # nested prefixes that must each reconstruct x
    row_cap: int | None = None  # selection "batch": no row keeps more than this many latents (None: no cap)

    @model_validator(mode="after")
    def _cap_at_least_k(self) -> "TopKConfig":
        if self.k > self.d_sae:  # torch's topk would fail at the first batch, naming no config
            raise ValueError(f"k {self.k} is more than the dictionary's {self.d_sae} latents (d_sae); use a k of at "
                             f"most {self.d_sae}")
        if self.row_cap is not None and self.selection != "batch":
            raise ValueError(f"row_cap {self.row_cap} caps a BatchTopK selection; set selection 'batch' (this one is "
                             f"{self.selection!r}) or remove row_cap")
        if self.row_cap is not None and self.row_cap < self.k:
            raise ValueError(f"row_cap {self.row_cap} is below k = {self.k}: a batch could not keep k latents per row")
        return self


def statistical_threshold(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row threshold mean + std · Φ⁻¹(1 − k/M), shaped to broadcast against ``pre``."""
    z = NormalDist().inv_cdf(1 - k / pre.shape[-1])
    return pre.mean(-1, keepdim=True) + pre.std(-1, keepdim=True) * z


def batch_top_indices(pre: torch.Tensor, k: int, row_cap: int | None = None) -> torch.Tensor:
    """Flat indices of the k·B largest entries of ``pre [B, M]`` (BatchTopK's training selection).

    Exact, but cheaper than one top-k over all B·M entries: the batch's top entries are taken from each
    row's own top 4k candidates. The n-th largest candidate τ is at most the batch's n-th largest entry, so
    a row whose smallest candidate is below τ holds nothing else in the batch's top; a row whose candidates
    all reach τ may, and offers all its entries instead (at initialisation on Gemma 3 270M a few rows do,
    and one top-k over the whole batch cost 1.5x x·W_enc at 4,096 latents).

    ``row_cap`` (≥ k) takes the k·B largest entries among each row's own ``row_cap`` largest instead: no row
    keeps more than ``row_cap`` latents. At initialisation the uncapped selection gives Gemma's highest-norm
    rows thousands of latents each (up to 2,144 of 16,384 on Gemma 3 270M, and none to 29 % of rows), whose
    reconstructions then overshoot by far (docs/methods/sae_quality.md).
    """
    n, (rows, width) = k * pre.shape[0], pre.shape
    per_row = min(width, row_cap or 4 * k)
    if per_row == width:
        return pre.reshape(-1).topk(n, sorted=False).indices
    vals, cols = pre.topk(per_row, dim=-1, sorted=False)
    top = vals.reshape(-1).topk(n, sorted=False)
    full = vals.min(-1).values >= top.values.min()
    if row_cap is not None or not bool(full.any()):
        return top.indices // per_row * width + cols.reshape(-1)[top.indices]
    full_rows, part_rows = full.nonzero().squeeze(1), (~full).nonzero().squeeze(1)
    pool = torch.cat([vals[part_rows].reshape(-1), pre[full_rows].reshape(-1)])
    where = torch.cat([(part_rows[:, None] * width + cols[part_rows]).reshape(-1),
                       (full_rows[:, None] * width + torch.arange(width, device=pre.device)).reshape(-1)])
    return where[pool.topk(n, sorted=False).indices]


# Weight of each batch's smallest kept activation in BatchTopK's running inference threshold.
BATCH_THRESHOLD_RATE = 0.01


def batch_top_pairs(pre: torch.Tensor, k: int, row_cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (row, latent) pairs of the positive entries among the k·B largest of ``pre [B, M]``."""
    idx = batch_top_indices(pre, k, row_cap).sort().values
    idx = idx[pre.reshape(-1)[idx] > 0]
    return idx // pre.shape[1], idx % pre.shape[1]


class TopK(Dictionary):
    kind = "topk"
    Config = TopKConfig
    jumprelu_keeps: ClassVar[set[str]] = {"matryoshka_widths"}  # config fields the inference form keeps
    jumprelu_form: ClassVar[dict[str, str]] = {"kind": "jumprelu"}  # and what it is instead

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        # BatchTopK's inference threshold: running mean of the smallest kept activation per batch.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        self.prefix_ends = prefix_ends(cfg.matryoshka_widths, cfg.d_sae)

    def _select(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        k, sel = self.cfg.k, self.cfg.selection
        pre = torch.relu(pre)
        if sel == "statistical":
            return pre * (pre > statistical_threshold(pre, k))
        if sel == "batch" and training:
            flat = pre.reshape(-1)
            idx = batch_top_indices(pre, k, self.cfg.row_cap)
            return torch.zeros_like(flat).scatter(0, idx, flat[idx]).reshape(pre.shape)
        if sel == "batch":
            return pre * (pre > self.threshold)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self._select(pre, training=False)

    def _selected_pairs(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-major (row, latent) pairs the training-time selection keeps."""
        k, sel = self.cfg.k, self.cfg.selection
        pre = torch.relu(pre)
        if sel == "statistical":
            return pairs(pre > statistical_threshold(pre, k))
        if sel == "batch":
            return batch_top_pairs(pre, k, self.cfg.row_cap)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)  # CSR order: columns ascending within each row
        keep = vals.gather(-1, order).reshape(-1) > 0  # a row may have fewer than k positive entries
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows[keep], idx.reshape(-1)[keep]

    def loss(self, x: torch.Tensor, sparsity_coeff: float = 0.0, sparse: bool = True,
             target: torch.Tensor | None = None) -> LossParts:
        """‖x − x̂‖² plus the AuxK loss; sparsity is set by k, so the coefficient is unused. ``target`` (in
        training units) replaces the scaled input as what the decoder reconstructs (a transcoder's output)."""
        if not sparse:
            return self._dense_loss(x, target)
        xs, shift, xin, pre = self.gathered_inputs(x)
        with torch.no_grad():
            rows, cols = self._selected_pairs(pre)
        f = GatheredPre.apply(xin, self.W_enc, self.b_enc, pre[rows, cols], rows, cols, shift)
        rec = sparse_reconstruction(xs if target is None else target, f, self.W_dec, self.b_dec, rows, cols, self.prefix_ends)
        counts = torch.bincount(cols, minlength=self.cfg.d_sae)
        self._track(counts > 0, x.shape[0], f.detach())
        aux_shift = shift if self.cfg.aux_b_dec else None
        aux = self._aux_loss(pre, rec.err, lambda r, c, v: GatheredPre.apply(xin, self.W_enc, self.b_enc, v, r, c, aux_shift))
        total = rec.loss if aux is None else rec.loss + self.cfg.aux_coeff * aux
        return LossParts(loss=total, mse=rec.mse, l0=torch.tensor(len(rows) / x.shape[0]), counts=counts, aux=aux)

    def _dense_loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> LossParts:
        if self.cfg.apply_b_dec_to_input and not self.cfg.aux_b_dec:
            # AuxK reads pre-activations with no b_dec on their path; the main loss gets b_dec's input gradient back
            # through a term that is zero in value (one vector product, not a second encoder pass).
            aux_pre = (x.to(self.W_enc.dtype) * self.input_scale - self.b_dec.detach()) @ self.W_enc + self.b_enc
            pre = aux_pre - (self.b_dec - self.b_dec.detach()) @ self.W_enc
        else:
            pre = aux_pre = self.pre_acts(x)
        f = self._select(pre, training=True)
        rec = dense_reconstruction(x.to(pre.dtype) * self.input_scale if target is None else target, f, self.W_dec, self.b_dec, self.prefix_ends)
        counts = (f > 0).sum(0)
        self._track(counts > 0, x.shape[0], f[f > 0].detach())
        aux = self._aux_loss(aux_pre, rec.err)
        total = rec.loss if aux is None else rec.loss + self.cfg.aux_coeff * aux
        return LossParts(loss=total, mse=rec.mse, l0=(f > 0).float().sum(-1).mean(), counts=counts, aux=aux,
                         codes=f.detach())

    @torch.no_grad()
    def as_jumprelu(self) -> Dictionary:
        """The JumpReLU SAE that gives this BatchTopK SAE's inference codes: every θᵢ = the batch threshold."""
        if self.cfg.selection != "batch":
            raise ValueError(f"only a BatchTopK SAE infers with one threshold; this one selects {self.cfg.selection!r}")
        keep = self.cfg.model_dump(include=set(DictionaryConfig.model_fields) | self.jumprelu_keeps)
        jr = build({**keep, **self.jumprelu_form})
        state = {k: v for k, v in self.state_dict().items() if k not in ("threshold", "tokens_since_fired")}
        jr.load_state_dict({**state, "threshold": self.threshold.float().expand(self.cfg.d_sae).clone()})
        return jr.to(self.W_enc.device)

    @torch.no_grad()
    def _track(self, fired: torch.Tensor, rows: int, active: torch.Tensor) -> None:
        """Dead-latent clock for AuxK, and BatchTopK's inference threshold."""
        self.tokens_since_fired.add_(rows).masked_fill_(fired, 0)
        if self.cfg.selection == "batch" and active.numel():
            self.threshold.lerp_(active.min().to(self.threshold.dtype), BATCH_THRESHOLD_RATE if self.threshold > 0 else 1.0)

    def _aux_loss(self, pre: torch.Tensor, err: torch.Tensor, gather: Gather | None = None) -> torch.Tensor | None:
        """AuxK over the latents that have not fired for ``dead_after_tokens`` rows."""
        dead = self.tokens_since_fired > self.cfg.dead_after_tokens
        if gather is not None and bool(dead.any()):
            pre = pre.index_select(1, dead.nonzero().squeeze(1))  # the sparse path ranks the dead columns alone
        return aux_loss(pre, err, dead, self.cfg.aux_k or self.cfg.d_in // 2, self.W_dec, gather)
