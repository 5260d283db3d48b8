"""JumpReLU sparse autoencoder, trained as in Gemma Scope.

Sources: Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders" (arXiv 2407.14435), Sec. 3 (the JumpReLU SAE and its L0 loss) and Sec. 4 (the
straight-through pseudo-derivatives with a kernel of bandwidth ε); Lieberum et al. 2024, "Gemma
Scope" (arXiv 2408.05147), Sec. 3 (training recipe). See docs/methods/jumprelu.md.

    z = W_encᵀ x + b_enc,   f = z ⊙ H(z − θ),   x̂ = W_decᵀ f + b_dec
    L = ‖x − x̂‖² + λ ‖f‖₀ = ‖x − x̂‖² + λ Σᵢ H(zᵢ − θᵢ)

H has zero derivative almost everywhere, so θ is trained through pseudo-derivatives built from the
rectangle kernel K(u) = 1[|u| ≤ ½]:  ∂/∂θ [z H(z − θ)] := −(θ/ε) K((z − θ)/ε) and
∂/∂θ H(z − θ) := −(1/ε) K((z − θ)/ε). The second is the exact derivative of the step smoothed by K.

Gemma Scope 2 (Google DeepMind, December 2025) trains its JumpReLU SAEs with three more terms, each an
option here (see docs/methods/jumprelu.md for the forms and why each was chosen):

* a quadratic L0 penalty towards a target, ``sparsity_loss="quadratic"``: λ (L0/L0_target − 1)², with L0
  the batch's mean count of active latents through the step pseudo-derivative above;
* a frequency penalty against dense latents, ``freq_coeff`` λ_f: λ_f Σᵢ max(0, pᵢ − p_max)², pᵢ the
  fraction of the batch's rows on which latent i fires (same pseudo-derivative), p_max = ``freq_max``;
* the Matryoshka reconstruction loss over nested prefixes of the latents, ``matryoshka_widths``
  (scope/dictionaries/matryoshka.py).

Against dead latents, beside the pre-activation loss, ``aux_coeff`` adds TopK's AuxK loss
(scope/dictionaries/auxk.py) over the latents the trainer's firing record calls dead.

With ``apply_b_dec_to_input`` the encoder sees x − b_dec, but no gradient reaches b_dec through that path:
b_dec learns as the decoder's bias only. The θ are fixed thresholds on the pre-activations and a shift of
b_dec moves every pre-activation at once, so through the encoder the L0 and frequency penalties (and AuxK)
could lower the firing of all latents together with one vector, which Adam with β1 = 0 moves by about the
learning rate per coordinate per step. In the 10M study a quadratic-penalty JumpReLU with that gradient
fell from L0 ~45 to L0 ~6 within 30 steps, with almost no latent dead beforehand (docs/methods/sae_quality.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pydantic import model_validator

from scope.dictionaries.auxk import aux_loss
from scope.dictionaries.base import Dictionary, DictionaryConfig
from scope.dictionaries.losses import LossParts
from scope.dictionaries.matryoshka import dense_reconstruction, prefix_ends, sparse_reconstruction
from scope.dictionaries.sparse import GatheredPre, encode_pairs
from scope.dictionaries.topk import BATCH_THRESHOLD_RATE, batch_top_pairs


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 for |u| ≤ 1/2, else 0."""
    return (u.abs() <= 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """z ⊙ H(z − θ): the usual gradient in z, the kernel pseudo-derivative in θ."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(grad.dtype)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad
        return grad_z, grad_theta.sum_to_size(theta.shape).to(theta.dtype), None


class StepFn(torch.autograd.Function):
    """H(z − θ): no gradient in z, the kernel pseudo-derivative in θ."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad
        return None, grad_theta.sum_to_size(theta.shape).to(theta.dtype), None


def quadratic_l0_penalty(l0: torch.Tensor, target_l0: float) -> torch.Tensor:
    """Gemma Scope 2's L0 penalty before its coefficient: the squared relative distance (L0/target − 1)²."""
    return (l0 / target_l0 - 1).pow(2)


# Above this fraction of active (row, latent) pairs the sparse kernels lose to dense matmuls
# (measured break-even on CPU: about 8 %).
DENSE_ABOVE = 0.05


class JumpReLUConfig(DictionaryConfig):
    kind: Literal["jumprelu"] = "jumprelu"
    bandwidth: float = 0.001  # ε, in the normalised units where E‖x‖² = 1
    threshold_init: float = 0.001
    # "step": Gemma Scope's λ‖f‖₀; "tanh": λ Σᵢ tanh(c·fᵢ‖W_dec,ᵢ‖), Anthropic's smooth stand-in for it;
    # "quadratic": Gemma Scope 2's λ (L0/target_l0 − 1)².
    sparsity_loss: Literal["step", "tanh", "quadratic"] = "step"
    tanh_scale: float = 4.0  # c
    target_l0: float | None = None  # the L0 the quadratic penalty pulls towards
    pre_act_coeff: float = 0.0  # λ_P of the pre-activation loss on dead latents (0: off, as in Gemma Scope)
    # What it moves: "all" (θ, W_enc and b_enc of the dead latents, as Anthropic's) or "threshold" (θ alone)
    pre_act_on: Literal["all", "threshold"] = "all"
    freq_coeff: float = 0.0  # λ_f of the frequency penalty (0: off)
    freq_max: float = 0.1  # p_max: firing fraction above which a latent is penalised
    matryoshka_widths: list[int] | None = None  # nested prefixes that must each reconstruct x
    aux_coeff: float = 0.0  # weight of the AuxK loss on dead latents (0: off)
    aux_k: int | None = None  # dead latents per row in it; default d_in // 2, as for TopK
    batchtopk_steps: int = 0  # train the first N steps as a BatchTopK SAE with k = target_l0 (0: off)
    row_cap: int | None = None  # in that phase no row keeps more than this many latents (None: no cap)

    @model_validator(mode="after")
    def _target_for_quadratic(self) -> "JumpReLUConfig":
        for option, on in (("sparsity_loss 'quadratic'", self.sparsity_loss == "quadratic"),
                           (f"batchtopk_steps {self.batchtopk_steps}", self.batchtopk_steps > 0)):
            if on and not (self.target_l0 and 0 < self.target_l0 < self.d_sae):
                raise ValueError(f"{option} needs target_l0 in (0, d_sae={self.d_sae}), got {self.target_l0}")
        if self.row_cap is not None and not (self.batchtopk_steps and self.row_cap >= self.target_l0):
            raise ValueError(f"row_cap {self.row_cap} caps the BatchTopK phase's latents per row; it needs "
                             f"batchtopk_steps > 0 (got {self.batchtopk_steps}) and target_l0, the phase's k, of at "
                             f"most row_cap (got {self.target_l0})")
        return self


class JumpReLU(Dictionary):
    """JumpReLU SAE with a per-latent threshold θ, a float32 parameter trained directly."""

    kind = "jumprelu"
    Config = JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        # θ is trained directly (not in log space): Adam then moves it by about the learning rate
        # per step, so short runs reach thresholds of the pre-activations' scale.
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.threshold_init)))
        self.prefix_ends = prefix_ends(cfg.matryoshka_widths, cfg.d_sae)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:  # θ stays float32 whatever the dictionary's dtype
            self.threshold.data = self.threshold.data.float()
        return out

    def trained_threshold(self) -> nn.Parameter:
        return self.threshold

    @torch.no_grad()
    def project(self) -> None:
        super().project()
        self.threshold.clamp_(min=1e-6)

    @torch.no_grad()
    def init_thresholds(self, x: torch.Tensor, l0: float) -> None:
        """Set each θᵢ to the (1 − l0/d_sae) quantile of its pre-activations on ``x``: L0 ≈ ``l0`` from step 0.

        With θ = 0.001 and W_enc = W_decᵀ about half the latents fire at first; starting at the target
        sparsity instead spares a short run its dense first phase (cf. the initialisation of b_enc
        for a fixed firing rate in Conerly et al., Anthropic circuits update, January 2025).
        """
        if not 0 < l0 < self.cfg.d_sae:
            raise ValueError(f"init L0 must be in (0, d_sae={self.cfg.d_sae}), got {l0}")
        pre = self.pre_acts(x.to(self.W_enc.device)).float()
        k = min(pre.shape[0], max(1, round(pre.shape[0] * (1 - l0 / self.cfg.d_sae))))
        self.threshold.copy_(pre.kthvalue(k, dim=0).values.clamp_min(self.cfg.bandwidth))

    def _sparsity(self, f: torch.Tensor, z: torch.Tensor, theta: torch.Tensor, rows: int,
                  cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(sparsity term before λ, weighted frequency penalty) for codes ``f`` of pre-activations ``z``.

        ``z`` is either dense ``[rows, d_sae]`` or the gathered pairs whose latents ``cols`` names.
        """
        cfg = self.cfg
        step = StepFn.apply(z, theta, cfg.bandwidth) if cfg.sparsity_loss != "tanh" or cfg.freq_coeff else None
        if cfg.sparsity_loss == "tanh":
            dec_norm = self.W_dec.norm(dim=1)  # only tanh needs it: 10M values read per step at 16k latents
            sparsity = torch.tanh(cfg.tanh_scale * f * (dec_norm if cols is None else dec_norm[cols])).sum() / rows
        else:
            l0 = step.sum() / rows
            sparsity = l0 if cfg.sparsity_loss == "step" else quadratic_l0_penalty(l0, cfg.target_l0)
        if not cfg.freq_coeff:
            return sparsity, 0.0
        fired = step.sum(0) if cols is None else \
            torch.zeros(cfg.d_sae, dtype=step.dtype, device=step.device).index_add(0, cols, step)
        return sparsity, cfg.freq_coeff * torch.relu(fired / rows - cfg.freq_max).pow(2).sum()

    def _pre_act(self, xin: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor | float:
        """λ_P · Σ over dead latents of ReLU(θᵢ − zᵢ)‖W_dec,ᵢ‖, per row: pulls latents that stopped firing back
        towards their thresholds (Conerly et al., Anthropic circuits update, January 2025). Only the
        encoder and θ of those latents move (θ alone with ``pre_act_on="threshold"``); the input is detached
        so b_dec is left alone.

        Why θ alone: a dead latent's encoder gets no other gradient but AuxK's, and Adam moves each of its
        parameters by about the learning rate per step whatever λ_P is. At lr 1e-3 b_enc then rose past θ by
        more than the pre-activations' spread before the firing record counted the latent alive, and in
        the 10M study 350 latents came back within 20 steps firing on most rows (L0 60 -> 344). Lowering θ,
        at its own slower learning rate, lets a latent fire again first on the rows it matches best."""
        if dead is None or self.cfg.pre_act_coeff == 0 or not bool(dead.any()):
            return 0.0
        idx = dead.nonzero().squeeze(1)
        z = xin.detach() @ self.W_enc[:, idx] + self.b_enc[idx]
        if self.cfg.pre_act_on == "threshold":
            z = z.detach()
        gap = torch.relu(self.threshold[idx].to(z.dtype) - z) * self.W_dec[idx].norm(dim=1)
        return self.cfg.pre_act_coeff * gap.sum(-1).mean()

    def _aux_on(self, dead: torch.Tensor | None) -> bool:
        return dead is not None and self.cfg.aux_coeff > 0 and bool(dead.any())

    def _aux(self, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor | None, gather=None) -> torch.Tensor | None:
        """The AuxK loss over ``dead`` latents, when ``aux_coeff`` is set and the trainer has a dead mask.

        ``pre`` must carry no gradient into b_dec (as for the pre-activation loss): a TopK SAE keeps k latents
        active whatever b_dec does, but a JumpReLU's θ are fixed against a shift of every pre-activation, and
        in the 10M study an AuxK gradient through b_dec took a JumpReLU from L0 62 to L0 5 within 60 steps.
        """
        if not self._aux_on(dead):
            return None
        return aux_loss(pre, err, dead, self.cfg.aux_k or self.cfg.d_in // 2, self.W_dec, gather)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def trainable_codes(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, the batch's mean L0), both with θ's kernel pseudo-derivatives, as in training: what a loss
        other than the trainer's (the KL fine-tune) needs to move θ."""
        theta = self.threshold.to(pre.dtype)
        codes = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth)
        return codes, StepFn.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()

    def loss(self, x: torch.Tensor, sparsity_coeff: float, sparse: bool = True,
             dead: torch.Tensor | None = None, target: torch.Tensor | None = None,
             step: int | None = None) -> LossParts:
        """‖x − x̂‖² + λ‖f‖₀ in normalised units, averaged over the batch (sparse kernels by default).

        ``dead`` ([d_sae] bool, from the trainer's firing record) switches on the pre-activation loss
        and the AuxK loss for those latents when ``pre_act_coeff`` or ``aux_coeff`` is set. ``target`` (in
        training units) replaces the scaled input as what the decoder reconstructs: a transcoder's output site
        (transcoder.py). ``step`` (0-based, from the trainer) before ``batchtopk_steps`` trains the BatchTopK
        phase instead (:meth:`_batchtopk_loss`).
        """
        if step is not None and step < self.cfg.batchtopk_steps:
            return self._batchtopk_loss(x, sparse, dead, target, first=step == 0)
        if not sparse:
            return self._dense_loss(x, sparsity_coeff, dead, target)
        eps = self.cfg.bandwidth
        xs = x.to(self.W_enc.dtype) * self.input_scale
        xin = (xs - self.b_dec if self.cfg.apply_b_dec_to_input else xs).detach()  # b_dec: decoder bias only
        theta = self.threshold.float()
        # Active codes plus the kernel window below θ, where θ's pseudo-derivative lives:
        # (z > θ) or |z − θ| ≤ ε/2  is  z ≥ θ − ε/2.
        dead_cols = dead.nonzero().squeeze(1) if self._aux_on(dead) else None
        enc = encode_pairs(xin, self.W_enc, self.b_enc, theta - eps / 2, dead_cols,
                           max_pairs=int(DENSE_ABOVE * x.shape[0] * self.cfg.d_sae))
        if enc is None:  # early in training: dense products are cheaper
            return self._dense_loss(x, sparsity_coeff, dead, target)
        rows, cols = enc.rows, enc.cols
        z = GatheredPre.apply(xin, self.W_enc, self.b_enc, enc.values, rows, cols, None)
        th = theta[cols]
        f = JumpReLUFn.apply(z, th, eps)
        rec = sparse_reconstruction(xs if target is None else target, f, self.W_dec, self.b_dec, rows, cols,
                                    self.prefix_ends)
        sparsity, freq = self._sparsity(f, z, th, x.shape[0], cols)
        active = z.detach() > th
        # index_add rather than bincount(cols[active]): a boolean index is a nonzero and a gather over every pair
        counts = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=cols.device).index_add_(0, cols, active.long())
        aux = self._aux(enc.columns, rec.err, dead,
                        lambda r, c, v: GatheredPre.apply(xin, self.W_enc, self.b_enc, v, r, c, None))
        loss = rec.loss + sparsity_coeff * sparsity + freq + self._pre_act(xin, dead)
        return LossParts(loss=loss if aux is None else loss + self.cfg.aux_coeff * aux, mse=rec.mse,
                         l0=active.sum() / x.shape[0], counts=counts, aux=aux)

    def _batchtopk_loss(self, x: torch.Tensor, sparse: bool, dead: torch.Tensor | None,
                        target: torch.Tensor | None, first: bool) -> LossParts:
        """A BatchTopK step (k = target_l0) of this JumpReLU, with θ kept at BatchTopK's inference threshold.

        The batch's k·B largest pre-activations are kept (Bussmann et al. 2024), the loss is the
        reconstruction plus AuxK on dead latents, and every θᵢ follows the running mean of the smallest kept
        activation, so that at any step the JumpReLU infers as the BatchTopK SAE would (TopK.as_jumprelu).
        When the phase ends each θᵢ starts from that shared threshold and trains on its own. Why: in the 10M
        study a JumpReLU trained from scratch lost 29-42 % of its latents while BatchTopK kept all but a few
        (docs/methods/sae_quality.md); a latent dies in a JumpReLU when its pre-activations sink below its θ, and
        in the BatchTopK phase a latent fires whenever it ranks in the batch's top, whatever its θ.
        """
        xs = x.to(self.W_enc.dtype) * self.input_scale
        xin = (xs - self.b_dec if self.cfg.apply_b_dec_to_input else xs).detach()  # b_dec: decoder bias only
        goal = xs if target is None else target
        with torch.set_grad_enabled(not sparse):  # the sparse path regathers its pairs with their gradient
            z = torch.addmm(self.b_enc, xin, self.W_enc)
        pre = z.detach().float()
        with torch.no_grad():
            rows, cols = batch_top_pairs(pre, round(self.cfg.target_l0), self.cfg.row_cap)
        kept = pre[rows, cols]
        if sparse:
            f = GatheredPre.apply(xin, self.W_enc, self.b_enc, kept, rows, cols, None)
            rec = sparse_reconstruction(goal, f, self.W_dec, self.b_dec, rows, cols, self.prefix_ends)
            aux_pre = pre.index_select(1, dead.nonzero().squeeze(1)) if self._aux_on(dead) else pre
            aux = self._aux(aux_pre, rec.err, dead,
                            lambda r, c, v: GatheredPre.apply(xin, self.W_enc, self.b_enc, v, r, c, None))
        else:
            keep = torch.zeros_like(z, dtype=torch.bool)
            keep[rows, cols] = True
            codes = z * keep
            rec = dense_reconstruction(goal, codes, self.W_dec, self.b_dec, self.prefix_ends)
            aux = self._aux(z, rec.err, dead)
        if kept.numel():  # TopK._track's running threshold, shared by every θᵢ
            with torch.no_grad():
                rate = 1.0 if first else BATCH_THRESHOLD_RATE
                self.threshold.fill_(torch.lerp(self.threshold[0], kept.min(), rate))
        counts = torch.bincount(cols, minlength=self.cfg.d_sae)
        loss = rec.loss if aux is None else rec.loss + self.cfg.aux_coeff * aux
        return LossParts(loss=loss, mse=rec.mse, l0=torch.tensor(len(rows) / x.shape[0]), counts=counts, aux=aux,
                         codes=None if sparse else codes.detach())

    def _dense_loss(self, x: torch.Tensor, sparsity_coeff: float, dead: torch.Tensor | None = None,
                    target: torch.Tensor | None = None) -> LossParts:
        xs = x.to(self.W_enc.dtype) * self.input_scale
        xin = xs - self.b_dec.detach() if self.cfg.apply_b_dec_to_input else xs  # b_dec: decoder bias only (module doc)
        pre = xin @ self.W_enc + self.b_enc
        theta = self.threshold.float().to(pre.dtype)
        f = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth)
        rec = dense_reconstruction(xs if target is None else target, f, self.W_dec, self.b_dec, self.prefix_ends)
        sparsity, freq = self._sparsity(f, pre, theta, x.shape[0])
        aux = self._aux(xin.detach() @ self.W_enc + self.b_enc if self._aux_on(dead) else pre, rec.err, dead)
        loss = rec.loss + sparsity_coeff * sparsity + freq + self._pre_act(xin, dead)
        return LossParts(loss=loss if aux is None else loss + self.cfg.aux_coeff * aux, mse=rec.mse,
                         l0=(f != 0).sum(-1).float().mean(), counts=(f != 0).sum(0), aux=aux, codes=f.detach())
