"""The small base every dictionary shares: config, parameters, input scale, save/load, registry.

Parameters follow the layout Gemma Scope and SAELens use, so interop is a rename at most:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.
A dictionary carries one fixed ``input_scale`` c: it codes c·x and decodes back to 1/c units, so
training sees inputs with E‖c·x‖² = 1 while the saved weights work on raw activations
(:meth:`Dictionary.fold_input_scale` moves c into the weights; the outputs do not change). A dictionary
that writes another site than it reads (a transcoder, transcoder.py) decodes to ``d_out`` and back by its
own :meth:`Dictionary.reconstruction_scale` instead of c.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file
from torch import nn

from scope.dictionaries.whitening import Whitening, WhiteningSpec
from scope.errors import ScopeError, validation_summary
from scope.files import read_json, read_safetensors

# Decoder rows per chunk of remove_parallel_decoder_grad on a CPU (128 rows of 640: 320 KiB, well inside L2).
DECODER_CHUNK_ROWS = 128

WEIGHTS = "weights.safetensors"
CONFIG = "cfg.json"
REGISTRY: dict[str, type["Dictionary"]] = {}


class DictionaryConfig(BaseModel):
    """Shape and provenance of a dictionary; each kind adds its own fields."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    apply_b_dec_to_input: bool = False
    hook: str | None = None
    model: str | None = None
    store: str | None = None
    whitening: WhiteningSpec | None = None  # PCA whitening against a control set (whitening.py)


class Dictionary(nn.Module):
    """encode(x) -> codes, decode(codes) -> x_hat, with a shared save/load."""

    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    kind: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True  # decoder rows kept at unit norm while training

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):  # a kind's own subclasses (transcoder activations) do not re-register it
            REGISTRY[cls.kind] = cls

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        d, m, out = cfg.d_in, cfg.d_sae, self.output_width(cfg)
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, out))
        self.b_dec = nn.Parameter(torch.zeros(out))
        self.register_buffer("input_scale", torch.ones(()))
        self.whitening = Whitening(d, cfg.whitening.unit_norm) if cfg.whitening is not None else None
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Random unit-norm decoder rows and W_enc = W_decᵀ (the Gemma Scope initialisation)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.T)

    @staticmethod
    def output_width(cfg: DictionaryConfig) -> int:
        """Width of the reconstruction: an SAE reconstructs its input."""
        return cfg.d_in

    def reconstruction_scale(self) -> torch.Tensor:
        """The factor that takes the reconstructed site into training units (an SAE's is its input scale)."""
        return self.input_scale

    @property
    def output_hook(self) -> str | None:
        """The hook the reconstruction is written to: an SAE writes the hook it reads."""
        return self.cfg.hook

    # --- the two maps ----------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of raw inputs ``x [..., d_in]``."""
        x = x.to(self.W_enc.dtype) * self.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gathered_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """For the sparse kernels: (c·x, the b_dec taken off before encoding or None, the encoder input, and
        the float32 pre-activations), the last two computed without autograd (GatheredPre gives the gradients)."""
        xs = x.to(self.W_enc.dtype) * self.input_scale
        shift = self.b_dec if self.cfg.apply_b_dec_to_input else None
        with torch.no_grad():
            xin = xs if shift is None else xs - shift
            pre = torch.addmm(self.b_enc, xin, self.W_enc).float()  # bias fused: one pass over [batch × d_sae]
        return xs, shift, xin, pre

    def encode_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of inputs already in the dictionary's input space (after any whitening)."""
        return self.activation(self.pre_acts(x))

    def decode_prepared(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the dictionary's input space (before undoing any whitening)."""
        return (codes @ self.W_dec + self.b_dec) / self.reconstruction_scale()

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw activations -> the space the dictionary codes (whitened, unit norm) and each row's norm."""
        if self.whitening is None:
            return x, None
        return self.whitening(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes ``[..., d_sae]`` of raw inputs."""
        return self.encode_prepared(self.prepare(x)[0])

    def decode(self, codes: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction in the inputs' raw units.

        A whitened dictionary codes unit-norm vectors, so its codes do not say how long the input
        was: pass the ``norms`` :meth:`prepare` returned, or get the control set's typical norm.
        """
        y = self.decode_prepared(codes)
        return y if self.whitening is None else self.whitening.inverse(y, norms)

    def decode_with_input(self, codes: torch.Tensor, x: torch.Tensor,
                          norms: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of codes whose input ``x`` is known: :meth:`decode` for an SAE (a transcoder adds
        its skip connection's part, which depends on x)."""
        return self.decode(codes, norms)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, reconstruction) of raw inputs; exact through any whitening."""
        u, norms = self.prepare(x)
        codes = self.encode_prepared(u)
        return codes, self.decode_with_input(codes, x, norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[1]

    def after_step(self, step: int) -> None:
        """Called by the trainer after each optimiser step (ICFL re-draws duplicate atoms here)."""

    def trained_threshold(self) -> nn.Parameter | None:
        """The per-latent threshold the optimiser trains (a JumpReLU's θ); None here (a BatchTopK's is a buffer)."""
        return None

    def latent_params(self) -> list[tuple[nn.Parameter, int]]:
        """The per-latent parameters, each with the axis that indexes the latents (W_enc's columns, W_dec's rows)."""
        theta = self.trained_threshold()
        return [(self.W_enc, 1), (self.W_dec, 0), (self.b_enc, 0)] + ([(theta, 0)] if theta is not None else [])

    # --- invariants ------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (in the scaled units the dictionary trains in)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row, so steps keep the rows' norm."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec.detach(), self.W_dec.grad
        sq = torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-16)
        # On a CPU, chunks of rows keep the product g·w in cache: over the whole matrix it writes and rereads a
        # temporary as large as W_dec, which cost 3x the chunked loop at 16,384 latents.
        step = DECODER_CHUNK_ROWS if w.device.type == "cpu" else w.shape[0]
        for i in range(0, w.shape[0], step):
            wc, gc = w[i:i + step], g[i:i + step]
            gc.addcmul_(((gc * wc).sum(1) / sq[i:i + step]).unsqueeze(1), wc, value=-1)

    @torch.no_grad()
    def project(self) -> None:
        """Put parameters back on their constraint set after an optimiser step."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Move ``input_scale`` c into the weights: W_enc·c, W_dec/c, b_dec/c; outputs are unchanged."""
        sd = {k: v.clone() for k, v in self.state_dict().items()}
        self.load_state_dict(self.folded(sd))

    def folded(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict with its scales moved into the weights: W_enc·c_in, W_dec/c_out, b_dec/c_out, where
        c_out is the reconstruction's scale (the input scale c_in for an SAE); the outputs are unchanged."""
        c_in = sd["input_scale"].clone()
        c_out = sd.get("output_scale", c_in).clone()
        sd["W_enc"], sd["W_dec"], sd["b_dec"] = sd["W_enc"] * c_in, sd["W_dec"] / c_out, sd["b_dec"] / c_out
        sd["input_scale"] = torch.ones(())
        return sd

    # --- files -----------------------------------------------------------------------------
    def save(self, folder: str | Path, fold: bool = True) -> Path:
        """Write ``weights.safetensors`` and ``cfg.json`` (atomically), folding the input scale."""
        folder = Path(folder)
        if (folder / "manifest.json").is_file():  # an activation store's (scope.store.manifest), named here so that
            # dictionaries need not import the store: its own cfg.json and weights would sit among the shards
            raise ScopeError(f"{str(folder)!r} holds an activation store; save the dictionary in a folder of its own")
        folder.mkdir(parents=True, exist_ok=True)
        sd = self.saved_tensors(fold)
        tmp = folder / f".{WEIGHTS}.tmp"
        save_file(sd, str(tmp), metadata={"kind": self.kind})
        tmp.replace(folder / WEIGHTS)
        (folder / f".{CONFIG}.tmp").write_text(self.cfg.model_dump_json(indent=2))
        (folder / f".{CONFIG}.tmp").replace(folder / CONFIG)
        return folder

    def saved_tensors(self, fold: bool = True) -> dict[str, torch.Tensor]:
        """The CPU tensors :meth:`save` writes (input scale folded when ``fold``); exporters reuse it."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return self.export_state(self.folded(sd) if fold else sd)

    def export_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook for kinds whose saved tensors differ from their parameters (e.g. log-threshold)."""
        return sd

    def import_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sd


def build(cfg: DictionaryConfig | dict) -> Dictionary:
    """A fresh dictionary of the kind named in ``cfg``."""
    data = cfg.model_dump() if isinstance(cfg, DictionaryConfig) else dict(cfg)
    kind = data.get("kind")
    if kind not in REGISTRY:
        raise ScopeError(f"unknown dictionary kind {kind!r}; known kinds: {sorted(REGISTRY)}")
    cls = REGISTRY[kind]
    try:
        return cls(cls.Config.model_validate(data))
    except ValidationError as err:
        raise ScopeError(f"bad {kind} dictionary config: {validation_summary(err)}") from None
    except ValueError as err:
        raise ScopeError(f"bad {kind} dictionary config: {err}") from err



def load(folder: str | Path, device: str | torch.device | None = None) -> Dictionary:
    """Load a dictionary saved by :meth:`Dictionary.save`."""
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise ScopeError(f"{str(folder)!r} is not a scope dictionary folder (needs {CONFIG} and {WEIGHTS})")
    resave = "save the dictionary again (Dictionary.save) or train it again"
    cfg = read_json(folder / CONFIG, resave)
    if not isinstance(cfg, dict):
        raise ScopeError(f"{folder / CONFIG} holds a JSON {type(cfg).__name__}, not a dictionary config object; {resave}")
    try:
        d = build(cfg)
    except ScopeError as err:
        raise ScopeError(f"{folder / CONFIG}: {err}") from None
    sd = d.import_state(read_safetensors(folder / WEIGHTS, resave))
    expected = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        raise ScopeError(f"weights in {folder} do not match its {CONFIG}: expected {expected}, found {got}")
    d.load_state_dict(sd)
    return d.to(device) if device is not None else d


