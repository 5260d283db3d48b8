"""Dictionaries spliced into the model: a hook's activation replaced by its reconstruction, the features exposed.

Inside ``with spliced(model, saes) as sp:`` every forward pass of the bridge, and every step of a
generation, runs with each dictionary at its hook: the activation x becomes x̂ = decode(encode(x)),
and ``sp.acts[hook]`` holds the feature activations of every token, ``[batch, pos, d_sae]`` (the
decoding steps of a cached generation are appended to its prompt's).

With ``error_term=True`` the reconstruction error x − x̂ is kept, so the model computes what it
computes without the dictionary while its features are exposed, and edits of the features
(:class:`FeatureEdit`: ablate, clamp, scale) change the activation by decode(edited) − decode(codes)
alone. It is computed as x + (decode(edited) − decode(codes)): bit-for-bit x when nothing is
edited. Gradients (attribution) reach the features through the decoder, and in this mode the
activation below the hook gets the gradient the clean model would give it (the error path is the
identity), so several spliced dictionaries do not see each other's reconstructions.

A transcoder (dictionaries/transcoder.py) is spliced at two hooks: its features are read at its input hook
(whose activation is left alone) and its output ŷ = decode(codes) + skip(x_in) replaces the activation of its
output hook (with ``error_term``, y + decode(edited) − decode(codes)); ``sp.acts`` is keyed by the input hook.

Position 0 (BOS in an unpadded or right-padded batch) keeps its activation unless ``splice_bos``:
stores leave BOS out, so a dictionary has never seen its very large activation. Feature positions
are absolute (BOS is 0); a negative position counts from the end of the prompt.

Sources: SAELens's ``HookedSAETransformer`` (its ``run_with_saes`` and ``use_error_term``), which
this follows in scope's terms, and the Gemma Scope tutorial (Lieberum et al. 2024), which puts a
JumpReLU SAE into Gemma with a forward hook and reads its features token by token. See
docs/methods/feature_analysis.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from scope.dictionaries.base import Dictionary
from scope.errors import ScopeError
from scope.hooks import PositionCounter, check_hooks, is_pairwise
from scope.models import LoadedModel

EditMode = Literal["ablate", "clamp", "scale"]
SAEs = Dictionary | Sequence[Dictionary] | Mapping[str, Dictionary]
HookFn = Callable[..., torch.Tensor]
Recorder = Callable[[torch.Tensor, torch.Tensor, int], None]  # (codes, input, first position) of each call


@dataclass(frozen=True)
class FeatureEdit:
    """Set features to zero (ablate), to ``value`` (clamp) or multiply them by ``value`` (scale).

    ``positions`` are absolute token positions (BOS is 0; negative ones count from the end of the
    prompt); None edits every position. ``hook`` names the dictionary when several are spliced.
    """

    features: tuple[int, ...]
    mode: EditMode = "ablate"
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    hook: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("ablate", "clamp", "scale"):
            raise ScopeError(f"a feature edit is 'ablate', 'clamp' or 'scale', got {self.mode!r}")
        if not self.features:
            raise ScopeError("a feature edit needs at least one feature")

    def apply(self, codes: torch.Tensor, first: int, prompt_len: int) -> torch.Tensor:
        """The edited codes ``[batch, pos, d_sae]`` of positions ``first … first + pos − 1``."""
        n = codes.shape[1]
        mask = torch.zeros(n, codes.shape[-1], dtype=torch.bool, device=codes.device)
        if self.positions is None:
            rows = torch.arange(n, device=codes.device)
        else:
            wanted = [p % prompt_len if p < 0 else p for p in self.positions]
            rows = torch.tensor([p - first for p in wanted if first <= p < first + n], dtype=torch.long,
                                device=codes.device)
        if not len(rows):
            return codes
        mask[rows[:, None], torch.tensor(self.features, device=codes.device)] = True
        if self.mode == "scale":
            return torch.where(mask, codes * self.value, codes)
        return torch.where(mask, torch.full_like(codes, 0.0 if self.mode == "ablate" else self.value), codes)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mode": self.mode, "value": self.value,
                "positions": None if self.positions is None else list(self.positions), "hook": self.hook}


def _edit(features: int | Sequence[int], mode: EditMode, value: float, positions: int | Sequence[int] | None,
          hook: str | None) -> FeatureEdit:
    feats = (features,) if isinstance(features, int) else tuple(int(f) for f in features)
    pos = None if positions is None else (positions,) if isinstance(positions, int) else tuple(map(int, positions))
    return FeatureEdit(feats, mode, float(value), pos, hook)


def ablate(features: int | Sequence[int], positions: int | Sequence[int] | None = None,
           hook: str | None = None) -> FeatureEdit:
    """Zero the features (at ``positions``, default every position)."""
    return _edit(features, "ablate", 0.0, positions, hook)


def clamp(features: int | Sequence[int], value: float, positions: int | Sequence[int] | None = None,
          hook: str | None = None) -> FeatureEdit:
    """Set the features to ``value`` (at ``positions``, default every position)."""
    return _edit(features, "clamp", value, positions, hook)


def scale(features: int | Sequence[int], factor: float, positions: int | Sequence[int] | None = None,
          hook: str | None = None) -> FeatureEdit:
    """Multiply the features by ``factor`` (at ``positions``, default every position)."""
    return _edit(features, "scale", factor, positions, hook)


def check_width(flat: torch.Tensor, sae: Dictionary, hook: Any, name: str | None = None, output: bool = False) -> None:
    """A hook tensor ``[batch, pos, width]`` must be as wide as the dictionary's input (``output``: its output)."""
    width = sae.W_dec.shape[1] if output else sae.cfg.d_in
    if flat.shape[-1] != width:
        # ``name`` is the hook as the user spelled it; the bridge's own name may be an alias (blocks.6.hook_out)
        raise ScopeError(f"hook {name or hook.name} has width {flat.shape[-1]} but the "
                         f"{'dictionary writes' if output else 'SAE expects'} {width}")


def writes_elsewhere(sae: Dictionary) -> bool:
    """True for a transcoder: it writes another hook than the one it reads."""
    return sae.output_hook is not None and sae.output_hook != sae.cfg.hook


@dataclass
class _Read:
    """What reading a dictionary's features off one call of its input hook gives its write."""

    xin: torch.Tensor  # the input activation [batch, pos, d_in], in the dictionary's dtype
    norms: torch.Tensor | None
    codes: torch.Tensor
    first: int  # absolute position of the call's first row


def _reader(sae: Dictionary, error_term: bool, on_codes: Recorder | None, name: str | None,
            positions: PositionCounter, prompt_len: list[int]) -> Callable[[torch.Tensor, Any], _Read]:
    """Features of one call's activation ``flat [batch, pos, d_in]``, reported to ``on_codes``."""

    def read(flat: torch.Tensor, hook: Any) -> _Read:
        check_width(flat, sae, hook, name)
        first = positions.advance(flat.shape[1])
        if first == 0:
            prompt_len[0] = flat.shape[1]
        xin = flat.to(sae.W_enc.dtype)
        u, norms = sae.prepare(xin.detach() if error_term else xin)
        codes = sae.encode_prepared(u)
        if error_term:  # the features are read off the activation; the gradient below goes by the error path
            codes = codes.detach()
        if torch.is_grad_enabled() and not codes.requires_grad:
            codes.requires_grad_()  # so attribution can ask for ∂metric/∂codes
        if on_codes is not None:
            on_codes(codes, flat, first)
        return _Read(xin, norms, codes, first)

    return read


def _writer(sae: Dictionary, error_term: bool, splice_bos: bool, edits: Sequence[FeatureEdit],
            prompt_len: list[int]) -> Callable[[torch.Tensor, _Read], torch.Tensor]:
    """The activation ``flat [batch, pos, width]`` of the written hook replaced by the (edited) reconstruction."""

    def write(flat: torch.Tensor, r: _Read) -> torch.Tensor:
        edited = r.codes
        for e in edits:
            edited = e.apply(edited, r.first, prompt_len[0])
        own = flat.to(sae.W_enc.dtype)
        if not error_term:
            new = sae.decode_with_input(edited, r.xin, r.norms)
        elif edited is r.codes and not r.codes.requires_grad:
            new = own  # nothing edited and no gradient wanted: the activation as it is
        else:
            new = own + (sae.decode(edited, r.norms) - sae.decode(r.codes, r.norms).detach())
        new = new.to(flat.dtype)
        if not splice_bos and r.first == 0:
            new = torch.cat([flat[:, :1], new[:, 1:]], dim=1)
        return new

    return write


def splice_hook(sae: Dictionary, *, error_term: bool = False, splice_bos: bool = False,
                edits: Sequence[FeatureEdit] = (), on_codes: Recorder | None = None, name: str | None = None) -> HookFn:
    """A forward hook that swaps the activation ``[batch, pos, ...]`` for the dictionary's reconstruction.

    ``on_codes(codes, x, first)`` sees the feature activations (before any edit), the flattened
    input and the absolute position of the call's first row.
    """
    prompt_len = [1]
    read = _reader(sae, error_term, on_codes, name, PositionCounter(), prompt_len)
    write = _writer(sae, error_term, splice_bos, edits, prompt_len)

    def hook_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        flat = x.reshape(*x.shape[:2], -1)
        return write(flat, read(flat, hook)).reshape(x.shape)

    return hook_fn


def transcoder_hooks(sae: Dictionary, *, error_term: bool = False, splice_bos: bool = False,
                     edits: Sequence[FeatureEdit] = (), on_codes: Recorder | None = None,
                     name: str | None = None) -> list[tuple[str, HookFn]]:
    """The two forward hooks of a transcoder: read its features at ``sae.cfg.hook`` (leaving that activation
    alone), write its output at ``sae.output_hook``. The read of each forward serves the write after it."""
    prompt_len = [1]
    read = _reader(sae, error_term, on_codes, name, PositionCounter(), prompt_len)
    write = _writer(sae, error_term, splice_bos, edits, prompt_len)
    last: list[_Read] = []

    def read_fn(x: torch.Tensor, *, hook: Any) -> torch.Tensor:
        last[:] = [read(x.reshape(*x.shape[:2], -1), hook)]
        return x

    def write_fn(y: torch.Tensor, *, hook: Any) -> torch.Tensor:
        if not last:
            raise ScopeError(f"the transcoder's output hook {sae.output_hook} fired before its input hook "
                             f"{sae.cfg.hook}; a transcoder must read a site that comes before the one it writes")
        flat = y.reshape(*y.shape[:2], -1)
        check_width(flat, sae, hook, sae.output_hook, output=True)
        return write(flat, last.pop()).reshape(y.shape)

    return [(sae.cfg.hook if name is None else name, read_fn), (sae.output_hook, write_fn)]


def as_hook_map(saes: SAEs) -> dict[str, Dictionary]:
    """{hook: dictionary} from one dictionary, a list of them (each at its own hook) or a mapping."""
    if isinstance(saes, Mapping):
        return dict(saes)
    found: dict[str, Dictionary] = {}
    for sae in [saes] if isinstance(saes, Dictionary) else list(saes):
        if not isinstance(sae, Dictionary):
            raise ScopeError(f"expected a dictionary (SAE), got {type(sae).__name__}")
        if sae.cfg.hook is None:
            raise ScopeError(f"the {sae.cfg.kind} dictionary (d_sae {sae.cfg.d_sae}) does not name its hook; "
                             "pass {hook: sae}, e.g. {'blocks.6.hook_resid_post': sae}")
        if sae.cfg.hook in found:
            raise ScopeError(f"two dictionaries at hook {sae.cfg.hook}; splice one per hook")
        found[sae.cfg.hook] = sae
    if not found:
        raise ScopeError("no dictionaries to splice in")
    return found


def check_features(sae: Dictionary, features: Sequence[int], hook: str) -> list[int]:
    """Feature ids as ints, each a feature of ``sae``; else an error naming the bad id and the range."""
    out = []
    for f in features:
        if isinstance(f, bool) or not isinstance(f, int) and not (isinstance(f, torch.Tensor) and f.ndim == 0):
            raise ScopeError(f"feature ids are integers, got {f!r}")
        f = int(f)
        if not 0 <= f < sae.cfg.d_sae:
            raise ScopeError(f"feature {f} is not a feature of the SAE at {hook}: it has features 0 … "
                             f"{sae.cfg.d_sae - 1}")
        out.append(f)
    return out


@dataclass
class Splice:
    """What a splice exposes while it is active: per hook, the features of the last forward pass."""

    saes: dict[str, Dictionary]
    error_term: bool
    edits: list[FeatureEdit]
    splice_bos: bool
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # [batch, pos, d_sae]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # the hook's activations [batch, pos, d_in]

    def _recorder(self, hook: str) -> Recorder:
        def record(codes: torch.Tensor, x: torch.Tensor, first: int) -> None:
            # Kept with their graph when gradients are on: attribution differentiates with respect to them.
            codes = codes if codes.requires_grad else codes.detach()
            x = x.detach()
            if first == 0 or hook not in self.acts:
                self.acts[hook], self.inputs[hook] = codes, x
            else:  # a decoding step: one more position
                self.acts[hook] = torch.cat([self.acts[hook], codes], dim=1)
                self.inputs[hook] = torch.cat([self.inputs[hook], x], dim=1)

        return record

    def hooks(self, record: bool = True) -> list[tuple[str, HookFn]]:
        """The bridge forward hooks: one per dictionary, two per transcoder (read and write)."""
        out: list[tuple[str, HookFn]] = []
        for h, sae in self.saes.items():
            kw = dict(error_term=self.error_term, splice_bos=self.splice_bos,
                      edits=[e for e in self.edits if e.hook == h], on_codes=self._recorder(h) if record else None,
                      name=h)
            out += transcoder_hooks(sae, **kw) if writes_elsewhere(sae) else [(h, splice_hook(sae, **kw))]
        return out


def _route(edits: Sequence[FeatureEdit], saes: dict[str, Dictionary]) -> list[FeatureEdit]:
    """Each edit with its hook filled in and its features checked."""
    out = []
    for e in edits:
        hook = e.hook
        if hook is None:
            if len(saes) != 1:
                raise ScopeError(f"{len(saes)} dictionaries are spliced in ({sorted(saes)}); name the hook of "
                                 f"the edit of features {list(e.features)}")
            hook = next(iter(saes))
        if hook not in saes:
            raise ScopeError(f"an edit names hook {hook!r}, but the spliced dictionaries are at {sorted(saes)}")
        check_features(saes[hook], e.features, hook)
        out.append(FeatureEdit(e.features, e.mode, e.value, e.positions, hook))
    return out


@contextmanager
def spliced(model: LoadedModel, saes: SAEs, *, error_term: bool = False, edits: Sequence[FeatureEdit] = (),
            splice_bos: bool = False, record: bool = True) -> Iterator[Splice]:
    """Run every forward pass and generation inside with the dictionaries spliced in at their hooks.

    ``record=False`` keeps no feature activations (long evaluations need none). The dictionaries are
    moved, in place, to the model's device.
    """
    found = as_hook_map(saes)
    written = [s.output_hook for s in found.values() if writes_elsewhere(s)]
    check_hooks(model, list(dict.fromkeys([*found, *written])))
    for hook, sae in found.items():
        if is_pairwise(hook):
            raise ScopeError(f"hook {hook} holds attention patterns [batch, head, query, key]; a dictionary "
                             "splices into hooks laid out [batch, pos, ...]")
        if sae.cfg.model and sae.cfg.model != model.spec:
            warnings.warn(f"the dictionary at {hook} was made for {sae.cfg.model!r}; splicing it into {model.spec!r}",
                          stacklevel=3)
        sae.to(model.device)
    sp = Splice(found, error_term, _route(edits, found), splice_bos)
    with model.bridge.hooks(fwd_hooks=sp.hooks(record)):
        yield sp


def prompt_tokens(model: LoadedModel, text: str) -> torch.Tensor:
    """``[1, pos]`` token ids of BOS + the text, on the model's device."""
    if not isinstance(text, str) or not text:
        raise ScopeError("the prompt is empty; give some text")
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[model.tokenizer.bos_token_id, *ids]], device=model.device)


def token_id(model: LoadedModel, token: str | int) -> int:
    """The id of a token given as its text (exactly one token, e.g. " Paris") or as an id."""
    if isinstance(token, int):
        if not 0 <= token < model.facts.d_vocab:
            raise ScopeError(f"token id {token} is outside the vocabulary 0 … {model.facts.d_vocab - 1}")
        return token
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ScopeError(f"{token!r} is {len(ids)} tokens {pieces}, not one; give a single token such as "
                         f"{pieces[0]!r} if any" if ids else f"{token!r} is no token; give one such as ' Paris'")
    return ids[0]


@torch.no_grad()
def feature_directions(sae: Dictionary, features: Sequence[int], norms: torch.Tensor | None = None,
                       chunk: int = 1024) -> torch.Tensor:
    """``[features, d_in]``: what a unit activation of each feature adds at the hook, decode(eᵢ) − decode(0).

    The decoder is affine in the codes (for a whitened dictionary, given the input's norm ``[1]``),
    so a feature active at a adds a times its direction.
    """
    idx = torch.as_tensor(list(features), dtype=torch.long, device=sae.W_dec.device)
    zero = torch.zeros(1, sae.cfg.d_sae, device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    base = sae.decode(zero, norms)
    parts = []
    for a in range(0, len(idx), chunk):
        eye = torch.zeros(len(idx[a : a + chunk]), sae.cfg.d_sae, device=zero.device, dtype=zero.dtype)
        eye[torch.arange(len(eye)), idx[a : a + chunk]] = 1
        parts.append(sae.decode(eye, norms) - base)
    return torch.cat(parts).float() if parts else base[:0].float()
