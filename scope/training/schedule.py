"""The learning-rate and sparsity-coefficient schedules, as multipliers per step (0-based)."""

from __future__ import annotations


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up over ``lr_warmup_steps``, constant, then linear decay to 0 from ``lr_decay_start``."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    start = int(cfg.lr_decay_start * total)
    decay = 1.0 if step < start or total <= start else max(0.0, (total - step) / (total - start))
    return warm * decay


def sparsity_at(step: int, cfg) -> float:
    """λ multiplier: rises linearly from 0 to 1 over ``sparsity_warmup_steps``."""
    return min(1.0, step / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
