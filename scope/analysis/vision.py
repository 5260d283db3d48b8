"""Class-embedding projections for vision-transformer classifiers, and a small ViT to study offline.

Any ViT-style classifier is described by :class:`ViTParts`: a function from images to the token
sequence entering the first block (class token first), the blocks, the final norm and the
classifier head. The head's weight rows are the class embeddings, and every token after every
block is scored for its image's class, as Vilas et al. (NeurIPS 2023, §3) do for ViT-B/32.
Offline there is no pretrained ViT, so :func:`train_tiny_vit` trains one on scikit-learn's
handwritten digits (8×8 pixels, 10 classes); :func:`timm_parts` adapts a timm model when present.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scope.analysis.class_embedding import ClassSpace, Identifiability, score_sites
from scope.errors import ScopeError


@dataclass
class ViTParts:
    """The pieces of a ViT classifier that the projection needs."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # images -> [batch, tokens, d], class token first
    blocks: Sequence[nn.Module]
    norm: nn.Module
    head: nn.Linear
    pool: str = "cls"  # the classifier reads the class token ("cls") or the mean of all tokens ("mean")

    def class_space(self) -> ClassSpace:
        return ClassSpace(norm=self.norm, embedding=self.head.weight.detach(),
                          bias=self.head.bias.detach() if self.head.bias is not None else None)

    @torch.no_grad()
    def representations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The token sequence after the embedding and after every block: ``[batch, tokens, d]`` each."""
        h = self.embed(images)
        out = [h]
        for block in self.blocks:
            h = block(h)
            out.append(h)
        return out

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's own logits, for checking the projection against."""
        h = self.norm(self.representations(images)[-1])
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(1))


class _Block(nn.Module):
    """Pre-norm transformer block (attention, then MLP), as in ViT."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln1(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """A small ViT: square patches, a class token, learned positions, pre-norm blocks, linear head."""

    def __init__(self, image: int = 8, patch: int = 2, channels: int = 1, d: int = 64, depth: int = 4,
                 heads: int = 4, classes: int = 10):
        super().__init__()
        if image % patch:
            raise ScopeError(f"image size {image} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads, 4 * d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        return torch.cat([self.cls.expand(b, -1, -1), self.proj(patches)], 1) + self.pos

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.embed(images)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])

    def parts(self) -> ViTParts:
        return ViTParts(embed=self.embed, blocks=list(self.blocks), norm=self.norm, head=self.head)


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits as ``[n, 1, 8, 8]`` images in [0, 1]: train and test splits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def train_tiny_vit(images: torch.Tensor, labels: torch.Tensor, epochs: int = 40, lr: float = 3e-3, seed: int = 0,
                   batch_size: int = 64, **shape) -> tuple[TinyViT, TinyViT]:
    """Train a :class:`TinyViT`; returns (trained, the same architecture at its random initialisation)."""
    torch.manual_seed(seed)
    model = TinyViT(image=images.shape[-1], channels=images.shape[1], classes=int(labels.max()) + 1, **shape)
    untrained = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(labels) // batch_size))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), untrained


def timm_parts(model: nn.Module) -> ViTParts:
    """Adapt a timm ``VisionTransformer`` (e.g. ``timm.create_model('vit_base_patch32_224', pretrained=True)``)."""
    needed = ("patch_embed", "blocks", "norm", "head")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ScopeError(f"{type(model).__name__} lacks {missing}; describe it with ViTParts(embed, blocks, norm, head)")

    def embed(images: torch.Tensor) -> torch.Tensor:
        h = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(h)) if hasattr(model, "norm_pre") else h

    pool = "cls" if getattr(model, "global_pool", "token") == "token" else "mean"
    return ViTParts(embed=embed, blocks=list(model.blocks), norm=model.norm, head=model.head, pool=pool)


def _image_batches(parts: ViTParts, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, None]]:
    for a in range(0, len(labels), batch_size):
        reps = parts.representations(images[a : a + batch_size])
        b, t, _ = reps[0].shape
        sites = {("embed" if i == 0 else f"block {i - 1}"): r.reshape(b * t, -1) for i, r in enumerate(reps)}
        yield sites, labels[a : a + batch_size].repeat_interleave(t), torch.arange(a, a + b).repeat_interleave(t), None


def vit_identifiability(parts: ViTParts, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 256) -> Identifiability:
    """Identifiability of each image's class at every token (class token and patches) after every block."""
    if len(images) != len(labels) or not len(labels):
        raise ScopeError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    sites = ["embed"] + [f"block {i}" for i in range(len(parts.blocks))]
    return score_sites(parts.class_space(), _image_batches(parts, images, labels, batch_size), sites, sites,
                       len(labels), "image")
