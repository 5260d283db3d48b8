"""The standard ReLU SAE with an L1 penalty weighted by decoder norms.

Source: Bricken et al. 2023, "Towards Monosemanticity" (ReLU SAE); the decoder-norm-weighted
penalty λ Σᵢ fᵢ ‖W_dec,ᵢ‖ from Anthropic's "Update on how we train SAEs" (April 2024), which lets
decoder rows keep free norms.
"""

from __future__ import annotations

from typing import Literal

import torch

from scope.dictionaries.base import Dictionary, DictionaryConfig
from scope.dictionaries.losses import LossParts


class ReLUConfig(DictionaryConfig):
    kind: Literal["relu"] = "relu"


class ReLU(Dictionary):
    kind = "relu"
    Config = ReLUConfig
    unit_norm_decoder = False  # the L1 term weights each latent by its decoder norm instead

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x: torch.Tensor, sparsity_coeff: float, sparse: bool = False) -> LossParts:
        """Plain path only: a ReLU SAE's codes are not sparse early in training."""
        f = self.encode_prepared(x)
        err = x.to(f.dtype) * self.input_scale - (f @ self.W_dec + self.b_dec)
        mse = err.pow(2).sum(-1).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        return LossParts(loss=mse + sparsity_coeff * l1, mse=mse, l0=(f > 0).float().sum(-1).mean(),
                         counts=(f > 0).sum(0), codes=f.detach())
