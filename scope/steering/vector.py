"""A steering vector on disk: ``vector.safetensors`` (w, b) and ``vector.json`` (where and how it was made)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scope.errors import ScopeError
from scope.files import read_json, read_safetensors
from scope.store.fs import StoreFS

WEIGHTS = "vector.safetensors"
META = "vector.json"
METHODS = ("reps", "lm", "diffmean", "feature")


@dataclass
class SteeringVector:
    """Rank-1 steering direction w with null-out threshold b, for ``hook`` of ``model``.

    Steering adds α·w; suppression applies Φ_null(h) = h − (ReLU(h·w + b)/‖w‖²)·w. ``scale`` is the
    residual stream's centred RMS norm at the layer, the unit ‖w‖ is measured in (see docs/methods/reps.md).
    """

    w: torch.Tensor
    b: float
    hook: str
    model: str
    concept: str
    method: str
    scale: float
    factors: list[float] = field(default_factory=list)  # the α set it was trained with (empty for DiffMean)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(self.hook.split(".")[1])

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("w")
        return {**d, "norm": float(self.w.norm()), "norm_over_scale": float(self.w.norm()) / self.scale}

    def save(self, folder: str | Path) -> Path:
        """Write ``vector.safetensors`` and ``vector.json`` atomically."""
        fs = StoreFS(str(folder))
        fs.makedirs()
        tmp = Path(folder) / f".{WEIGHTS}.tmp"
        save_file({"w": self.w.detach().float().cpu().contiguous(), "b": torch.tensor([float(self.b)])}, str(tmp))
        tmp.replace(Path(folder) / WEIGHTS)
        fs.write_atomic(META, json.dumps(self.meta(), indent=1).encode())
        return Path(folder)


class LayerScale:
    """Running float64 sums for a hook's mean μ and its scale r = sqrt(E‖h − μ‖²), the unit ‖w‖ is measured in."""

    def __init__(self, width: int):
        self.rows = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.squares = torch.zeros((), dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Rows ``[n, width]`` of the hook."""
        x = x.reshape(len(x), -1).double().cpu()
        self.total += x.sum(0)
        self.squares += (x * x).sum()
        self.rows += len(x)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)

    @property
    def scale(self) -> float:
        mean = self.mean
        return float((self.squares / max(self.rows, 1) - (mean * mean).sum()).clamp_min(0).sqrt())


def load_vector(folder: str | Path, device: str | torch.device | None = None) -> SteeringVector:
    """A steering vector saved by :meth:`SteeringVector.save`."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise ScopeError(f"{str(folder)!r} holds no steering vector ({META} + {WEIGHTS}); make one with `scope steer train`")
    remake = "make the vector again into a new folder (`scope steer train` or `scope steer from-feature`)"
    meta = read_json(folder / META, remake)
    needed = ("hook", "model", "concept", "method", "scale")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise ScopeError(f"{folder / META} is not a steering vector's description (it needs the keys "
                         f"{', '.join(needed)}); {remake}")
    t = read_safetensors(folder / WEIGHTS, remake, device=str(device or "cpu"))
    if set(t) != {"w", "b"}:
        raise ScopeError(f"{folder / WEIGHTS} holds tensors {sorted(t)}, not a steering vector's w and b; {remake}")
    keep = {k: meta[k] for k in (*needed, "factors", "info") if k in meta}
    return SteeringVector(w=t["w"], b=float(t["b"][0]), **keep)
