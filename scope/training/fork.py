"""Forking a training run: a new config that starts from another run's checkpoint instead of from step 0.

Why: variants of a recipe that differ only late in training (the step a JumpReLU leaves its BatchTopK phase, what
happens at that hand-over) share most of their steps. Trained from scratch each repeats them; forked from a
checkpoint of the run they share, each trains only its own tail, and ends with the weights the new config would
have reached from scratch, when nothing it changes acts before the fork's step.

What is checked, because it must hold for that (``plan_fork``):

- the same rows in the same order: store, hooks, batch size, seed, held-out split, shuffle buffer, norm filter;
- the same learning rate and sparsity coefficient at every step before the fork, for every dictionary;
- a JumpReLU's BatchTopK phase and its hand-over: the same, or both after the fork's step.

Every other field that differs is listed (``Fork.differences``), printed, and written with the run
(``forked_from.json``) for the user to judge: a dictionary option that already acted before the fork step (a
different ``aux_coeff``, say) makes the fork a different recipe from either config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scope.errors import ScopeError
from scope.training.config import TrainConfig
from scope.training.logging import METRICS
from scope.training.schedule import lr_at, sparsity_at

FORKED_FROM = "forked_from.json"
_DATA_FIELDS = ("store", "input_hook", "output_hook")
_TRAINER_DATA_FIELDS = ("batch_size", "seed", "held_out", "buffer_rows", "max_norm_ratio")


@dataclass(frozen=True)
class Fork:
    """Where a forked run starts: the parent run, its checkpoint's step, and which dictionary continues which."""

    parent: str
    step: int
    names: dict[str, str]  # each dictionary of the new config -> the parent's dictionary it continues
    differences: list[str]  # "field: parent's value -> new value", every field that differs


def plan_fork(parent: Path, parent_cfg: TrainConfig, step: int, cfg: TrainConfig) -> Fork:
    """Check that ``cfg`` can continue ``parent``'s run from ``step`` (module doc) and pair the dictionaries."""
    refuse = f"cannot fork {str(parent)!r} (at step {step})"
    for field in _DATA_FIELDS:
        if _input_hook(parent_cfg, field) != _input_hook(cfg, field):
            raise ScopeError(f"{refuse}: `{field}` differs ({_input_hook(parent_cfg, field)!r} there, "
                             f"{_input_hook(cfg, field)!r} here), so the rows trained on differ; a fork needs the same")
    for field in _TRAINER_DATA_FIELDS:
        old, new = getattr(parent_cfg.trainer, field), getattr(cfg.trainer, field)
        if old != new:
            raise ScopeError(f"{refuse}: trainer.{field} differs ({old} there, {new} here), so the rows of each step "
                             f"differ; a fork needs the same {field}")
    total = cfg.trainer.total_tokens // cfg.trainer.batch_size
    if step >= total:
        raise ScopeError(f"{refuse}: this config trains {total} steps, so nothing is left after step {step}; fork "
                         "from an earlier checkpoint or train longer")
    names = _pair(parent_cfg, cfg, refuse)
    parent_total = parent_cfg.trainer.total_tokens // parent_cfg.trainer.batch_size
    for new, old in names.items():
        a, b = _spec(parent_cfg, old), _spec(cfg, new)
        rates_a = (a.lr or parent_cfg.trainer.lr, a.threshold_lr or a.lr or parent_cfg.trainer.lr, a.sparsity_coeff)
        rates_b = (b.lr or cfg.trainer.lr, b.threshold_lr or b.lr or cfg.trainer.lr, b.sparsity_coeff)
        for s in range(step):  # exact, not a tolerance: both sides compute the same float expressions
            at_a = (lr_at(s, parent_total, parent_cfg.trainer),) * 2 + (sparsity_at(s, parent_cfg.trainer),)
            at_b = (lr_at(s, total, cfg.trainer),) * 2 + (sparsity_at(s, cfg.trainer),)
            if [r * m for r, m in zip(rates_a, at_a)] != [r * m for r, m in zip(rates_b, at_b)]:
                raise ScopeError(f"{refuse}: dictionary {new!r} would have trained at another learning rate or "
                                 f"sparsity coefficient at step {s + 1} (the warm-ups, lr, lr_decay_start or "
                                 "total_tokens differ in effect before the fork); fork from a run whose schedule "
                                 "matches up to the fork, or train from the start")
        # The hand-over (and a revival at it) happens once the step numbered batchtopk_steps is done, before the
        # checkpoint of that step is written: a fork at that step already has it.
        handover = (a.batchtopk_steps, a.handover_revive) != (b.batchtopk_steps, b.handover_revive)
        if handover and min(a.batchtopk_steps, b.batchtopk_steps) <= step:
            raise ScopeError(f"{refuse}: dictionary {new!r} leaves its BatchTopK phase at step "
                             f"{b.batchtopk_steps} (handover_revive {b.handover_revive}), the parent's {old!r} at "
                             f"{a.batchtopk_steps} (handover_revive {a.handover_revive}), and one of them at or "
                             "before the fork; fork from a checkpoint before both hand-overs")
    return Fork(str(parent), step, names, _differences(parent_cfg, cfg, names))


def _input_hook(cfg: TrainConfig, field: str) -> str | None:
    return (cfg.input_hook or cfg.hook) if field == "input_hook" else getattr(cfg, field)


def _spec(cfg: TrainConfig, name: str):
    return next(d for d in cfg.dictionaries if d.label() == name)


def _pair(parent_cfg: TrainConfig, cfg: TrainConfig, refuse: str) -> dict[str, str]:
    """Each dictionary continues the parent's of the same name; a lone dictionary continues a lone parent."""
    theirs = [d.label() for d in parent_cfg.dictionaries]
    ours = [d.label() for d in cfg.dictionaries]
    if len(ours) == 1 and len(theirs) == 1:
        return {ours[0]: theirs[0]}
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise ScopeError(f"{refuse}: dictionaries {missing} have no namesake there (it has {theirs}); give them "
                         "the names of the dictionaries they continue")
    return {n: n for n in ours}


def _differences(parent_cfg: TrainConfig, cfg: TrainConfig, names: dict[str, str]) -> list[str]:
    old, new = parent_cfg.model_dump(), cfg.model_dump()
    specs_old = {parent_cfg.dictionaries[i].label(): d for i, d in enumerate(old.pop("dictionaries"))}
    specs_new = {cfg.dictionaries[i].label(): d for i, d in enumerate(new.pop("dictionaries"))}
    found = _diff(old, new, "")
    for name, parent_name in names.items():
        found += _diff(specs_old[parent_name], specs_new[name], f"dictionaries[{name}].")
    return found


def _diff(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


def renamed_state(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (keyed ``NAME/...``) under the new config's dictionary names."""
    return {f"{new}/{key[len(old) + 1:]}": v for new, old in names.items()
            for key, v in tensors.items() if key.startswith(old + "/")}


def copy_history(fork: Fork, out: Path, snapshots: str) -> None:
    """Write ``forked_from.json`` and carry the parent's metrics rows and snapshots up to the fork's step into
    ``out``, renamed, so that the new run's curves start at step 0."""
    out.mkdir(parents=True, exist_ok=True)
    parent = Path(fork.parent)
    rows = []
    if (parent / METRICS).exists():
        for line in (parent / METRICS).read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if row is None or row.get("step", 0) > fork.step:
                continue
            kept = {k: v for k, v in row.items() if "/" not in k}
            for new, old in fork.names.items():
                kept.update({f"{new}/{k[len(old) + 1:]}": v for k, v in row.items() if k.startswith(old + "/")})
            rows.append(json.dumps(kept))
    (out / METRICS).write_text("".join(r + "\n" for r in rows))
    for folder in sorted((parent / snapshots).glob("step-*")):
        if int(folder.name.split("-")[1]) > fork.step:
            continue
        for new, old in fork.names.items():
            if (folder / old).is_dir() and not (out / snapshots / folder.name / new).exists():
                shutil.copytree(folder / old, out / snapshots / folder.name / new)
    (out / FORKED_FROM).write_text(json.dumps(asdict(fork), indent=1) + "\n")
