"""What a dictionary's training loss returns, shared by every kind."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    """Total loss plus its parts, all in the normalised units the dictionary trains in."""

    loss: torch.Tensor
    mse: torch.Tensor  # mean over the batch of ‖x − x̂‖²
    l0: torch.Tensor  # mean number of active latents per row
    counts: torch.Tensor  # [d_sae]: on how many rows of the batch each latent is active
    aux: torch.Tensor | None = None  # auxiliary loss (AuxK), already included in ``loss``
    codes: torch.Tensor | None = None  # dense codes, when the plain path computed them anyway

    @property
    def fired(self) -> torch.Tensor:
        """[d_sae] bool: latents active on at least one row of the batch."""
        return self.counts > 0
