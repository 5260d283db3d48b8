"""Hook points: listing, validation, and capture of several hooks in one early-stopped forward."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from scope.errors import ScopeError
from scope.models import LoadedModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Hooks whose tensors are laid out [batch, head, query_pos, key_pos] rather than [batch, pos, ...].
_PAIRWISE = ("hook_pattern", "hook_attn_scores")


def hook_names(model: LoadedModel, contains: str = "") -> list[str]:
    """Every hook point of the model whose name contains ``contains``, in forward order within each block."""
    names = [n for n in model.bridge.hook_dict if contains in n]
    if not names:  # a typo in the filter would otherwise list nothing and look like success
        parts = {p for n in model.bridge.hook_dict for p in n.split(".") if not p.isdigit()}
        close = difflib.get_close_matches(contains, sorted(parts), n=4, cutoff=0.6)
        hint = f"; closest name parts: {', '.join(close)}" if close else ""
        raise ScopeError(f"no hook point of {model.spec} contains {contains!r}{hint}; drop --contains to list all "
                         f"{len(model.bridge.hook_dict)}")
    return names


def block_of(name: str) -> int | None:
    """The block number in a hook name such as ``blocks.6.hook_resid_post``; None outside the blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def hook_layer(name: str, n_layers: int) -> int:
    """Block index a hook belongs to: -1 for embedding hooks, ``n_layers`` for the final norm/unembed."""
    block = block_of(name)
    if block is not None:
        return block
    if name.startswith(("embed", "hook_embed", "hook_pos_embed", "rotary_emb")):
        return -1
    return n_layers


def is_pairwise(name: str) -> bool:
    """True for attention patterns/scores, whose rows are query positions over key positions."""
    return name.endswith(_PAIRWISE)


class PositionCounter:
    """Absolute positions of the tensor a hook sees, across the steps of a cached generation.

    A call with several positions is a fresh forward (or a prompt) starting at 0; a call with one
    position continues where the last call stopped, as each KV-cached decoding step does.
    """

    def __init__(self) -> None:
        self.next = 0

    def advance(self, n: int) -> int:
        """The absolute position of the first of the ``n`` positions a hook sees now."""
        first = 0 if n > 1 else self.next
        self.next = first + n
        return first


def check_hooks(model: LoadedModel, names: Sequence[str]) -> list[str]:
    """Validate hook names; a wrong one is an error listing the closest valid names."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if not names:
        raise ScopeError("no hook points given; pass at least one, e.g. blocks.6.hook_resid_post")
    valid = model.bridge.hook_dict
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=6, cutoff=0.6)
            hint = f" closest valid names: {', '.join(close)}." if close else ""
            raise ScopeError(
                f"unknown hook point {name!r} for {model.spec} ({model.facts.n_layers} layers, "
                f"blocks.0 … blocks.{model.facts.n_layers - 1}).{hint} "
                f"List them all with: scope hooks --model {model.spec}"
            )
    if len(set(names)) != len(names):
        raise ScopeError(f"hook points repeat: {list(names)}")
    return list(names)


@torch.inference_mode()
def capture(
    model: LoadedModel,
    tokens: torch.Tensor,
    hooks: Sequence[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run one forward pass and return the named hook tensors, stopping after the last one fires.

    The forward is cut short as soon as every requested hook has fired, so the layers past the
    deepest hook and the unembedding are never computed. Shapes are as the bridge gives them:
    ``[batch, pos, d]`` for residual hooks, ``[batch, pos, head, d_head]`` for q/k/v/z and
    ``[batch, head, query, key]`` for attention patterns.
    """
    names = check_hooks(model, hooks)
    out: dict[str, torch.Tensor] = {}

    def make(name: str):
        def grab(tensor: torch.Tensor, *, hook) -> torch.Tensor:
            out[name] = tensor.detach()
            if len(out) == len(names):
                raise StopAtLayerException(tensor)
            return tensor

        return grab

    tokens = tokens.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    with model.bridge.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        model.bridge(tokens, attention_mask=attention_mask, return_type=None)
    missing = [n for n in names if n not in out]
    if missing:
        raise ScopeError(
            f"hook point(s) {missing} never fired on {model.spec}; some hooks are off until enabled "
            "(e.g. bridge.set_use_attn_result(True) for hook_result)"
        )
    return out
