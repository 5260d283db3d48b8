"""Transcoders: sparse codes read from one site, a reconstruction written to another (an MLP's input and output).

Sources: Dunefsky, Chlenski and Nanda 2024, "Transcoders Find Interpretable LLM Feature Circuits" (arXiv
2406.11944): a wide, sparsely activating layer trained to imitate an MLP sublayer, its loss the error on the
MLP's *output* plus a sparsity penalty on codes computed from the MLP's *input*; Paulo, Shabalin and Belrose
2025, "Transcoders Beat Sparse Autoencoders for Interpretability" (arXiv 2501.18823): skip transcoders, which
add an affine skip connection x_in W_skip so the sparse codes need not carry the MLP's linear part; Gemma
Scope 2 (Google DeepMind, December 2025), which releases JumpReLU transcoders with and without that skip
connection (``affine_skip_connection``) for every Gemma 3 model. See docs/methods/transcoders.md.

    f = act(c_in·x_in W_enc + b_enc),   ŷ = (f W_dec + b_dec + c_in·x_in W_skip) / c_out

with act the JumpReLU, TopK or BatchTopK activation of jumprelu.py / topk.py (the same code: a transcoder of
activation A *is* an A dictionary whose decoder writes ``d_out`` wide and whose loss reconstructs the output
site). c_in and c_out are two fixed scales, E‖c_in·x_in‖² = 1 and E‖c_out·y‖² = 1 on the training data; both
are folded into the weights on save (W_enc·c_in, W_dec/c_out, b_dec/c_out, W_skip·c_in/c_out).

``decode(codes)`` is f W_dec + b_dec in raw output units, without the skip term (which needs x_in): a
feature's direction at the output site is its row of W_dec. ``reconstruct(x_in)`` and ``forward`` include it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, model_validator
from torch import nn

from scope.dictionaries.base import Dictionary, DictionaryConfig
from scope.dictionaries.jumprelu import JumpReLU, JumpReLUConfig
from scope.dictionaries.losses import LossParts
from scope.dictionaries.topk import TopK, TopKConfig

ACTIVATIONS = ("jumprelu", "topk", "batchtopk")


class TranscoderFields(BaseModel):
    """What a transcoder adds to its activation's config: the output site and the skip connection."""

    d_out: int
    output_hook: str | None = None  # the hook the reconstruction is written to (``hook`` is the one read)
    skip: bool = False  # an affine skip connection x_in W_skip (a skip transcoder)
    apply_b_dec_to_input: bool = False  # b_dec lives at the output site, so it is never taken off the input

    @model_validator(mode="after")
    def _transcoder_rules(self) -> "TranscoderFields":
        if self.apply_b_dec_to_input:
            raise ValueError("a transcoder's b_dec lives at its output site; apply_b_dec_to_input must be false")
        if getattr(self, "whitening", None) is not None:
            raise ValueError("a transcoder does not whiten its input; drop `whitening`")
        return self


class JumpReLUTranscoderConfig(TranscoderFields, JumpReLUConfig):
    kind: Literal["transcoder"] = "transcoder"
    activation: Literal["jumprelu"] = "jumprelu"


class TopKTranscoderConfig(TranscoderFields, TopKConfig):
    kind: Literal["transcoder"] = "transcoder"
    activation: Literal["topk", "batchtopk"] = "topk"

    @model_validator(mode="before")
    @classmethod
    def _selection_from_activation(cls, data: Any) -> Any:
        """activation batchtopk is TopK's selection 'batch'; topk is 'exact' (or 'statistical')."""
        if isinstance(data, dict):
            act, sel = data.get("activation", "topk"), data.get("selection")
            if act == "batchtopk" and sel not in (None, "batch"):
                raise ValueError(f"activation batchtopk selects over the batch; selection {sel!r} contradicts it")
            if act == "topk" and sel == "batch":
                raise ValueError("selection 'batch' is activation batchtopk; say activation: batchtopk")
            if act == "batchtopk":
                data = {**data, "selection": "batch"}
        return data


class TranscoderConfig:
    """The config of a transcoder: :class:`JumpReLUTranscoderConfig` or :class:`TopKTranscoderConfig` by
    ``activation`` (jumprelu, topk, batchtopk)."""

    @staticmethod
    def model_validate(data: dict) -> DictionaryConfig:
        act = data.get("activation", "jumprelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown transcoder activation {act!r}; use one of {list(ACTIVATIONS)}")
        cls = JumpReLUTranscoderConfig if act == "jumprelu" else TopKTranscoderConfig
        return cls.model_validate(data)


class Transcoder(Dictionary):
    """Codes from the input site, reconstruction of the output site; the activation's own class does the rest.

    ``build({"kind": "transcoder", "activation": ...})`` (or ``Transcoder(cfg)``) gives the subclass of the
    activation: :class:`JumpReLUTranscoder` or :class:`TopKTranscoder`.
    """

    kind = "transcoder"
    Config = TranscoderConfig  # type: ignore[assignment]

    def __new__(cls, cfg: DictionaryConfig):
        if cls is Transcoder:
            cls = JumpReLUTranscoder if cfg.activation == "jumprelu" else TopKTranscoder
        return super().__new__(cls)

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        self.register_buffer("output_scale", torch.ones(()))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out)) if cfg.skip else None

    @staticmethod
    def output_width(cfg: DictionaryConfig) -> int:
        return cfg.d_out

    def reconstruction_scale(self) -> torch.Tensor:
        return self.output_scale

    @property
    def output_hook(self) -> str | None:
        return self.cfg.output_hook

    def reset_parameters(self, seed: int | None = None) -> None:
        """Unit-norm decoder rows and, independently, unit-norm encoder columns: input and output sites are
        different spaces, so W_enc = W_decᵀ (the SAE initialisation) has no meaning here. W_skip starts at 0."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            e = torch.randn(self.W_enc.shape, generator=g)
            self.W_enc.copy_(e / e.norm(dim=0, keepdim=True))
            if getattr(self, "W_skip", None) is not None:
                self.W_skip.zero_()

    def skip_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """c_in·x_in W_skip, in training units of the output site (zeros without a skip connection)."""
        xs = x.to(self.W_enc.dtype) * self.input_scale
        if self.W_skip is None:
            return xs.new_zeros(*xs.shape[:-1], self.cfg.d_out)
        return xs @ self.W_skip

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip connection's part of the output, x_in W_skip, in raw output units."""
        return self.skip_prepared(x) / self.output_scale

    def decode_with_input(self, codes: torch.Tensor, x: torch.Tensor,
                          norms: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ = decode(codes) + skip(x): what :meth:`reconstruct` and a splice write to the output site."""
        y = self.decode(codes)
        return y if self.W_skip is None else y + self.skip(x)

    def loss(self, x: torch.Tensor, sparsity_coeff: float = 0.0, sparse: bool = True, *,
             target: torch.Tensor | None = None, **kwargs: Any) -> LossParts:
        """The activation's loss with the output site as the reconstruction target: ‖c_out·y − ŷ‖² (+ sparsity).

        ``target`` is the raw output-site batch y, row for row with ``x``. The skip term is taken off the
        target, so the sparse kernels decode only the codes and W_skip gets its gradient through the target.
        """
        if target is None:
            raise ValueError("a transcoder's loss needs the output-site activations: loss(x_in, ..., target=y)")
        goal = target.to(self.W_enc.dtype) * self.output_scale
        if self.W_skip is not None:
            goal = goal - self.skip_prepared(x)
        return super().loss(x, sparsity_coeff, sparse, target=goal, **kwargs)

    def folded(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both scales into the weights; W_skip maps c_in·x_in to c_out·y, so it takes c_in/c_out."""
        ratio = sd["input_scale"] / sd["output_scale"]
        sd = super().folded(sd)
        if "W_skip" in sd:
            sd["W_skip"] = sd["W_skip"] * ratio
        sd["output_scale"] = torch.ones(())
        return sd


class JumpReLUTranscoder(Transcoder, JumpReLU):
    """A JumpReLU transcoder, Gemma Scope 2's kind: f = z ⊙ H(z − θ)."""

    Config = JumpReLUTranscoderConfig


class TopKTranscoder(Transcoder, TopK):
    """A TopK or BatchTopK transcoder; a BatchTopK one infers (and is saved, see :meth:`TopK.as_jumprelu`) as the
    JumpReLU transcoder with its one threshold."""

    Config = TopKTranscoderConfig
    jumprelu_keeps: ClassVar[set[str]] = {"matryoshka_widths", "d_out", "output_hook", "skip"}
    jumprelu_form: ClassVar[dict[str, str]] = {"kind": "transcoder", "activation": "jumprelu"}
