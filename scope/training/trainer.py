"""The training loop: several dictionaries from one pass over a store, resumable, data-parallel.

Recipe (Gemma Scope, Lieberum et al. 2024, Sec. 3; Rajamanoharan et al. 2024): inputs scaled by
one fixed factor so that E‖x‖² = 1 on the training data; Adam with β = (0, 0.999); the learning
rate warms up linearly and decays linearly to zero over the last part of training; the sparsity
coefficient λ warms up linearly from 0; decoder rows are kept at unit norm, with the gradient
component parallel to each row removed before every step. With ``torchrun`` each rank takes an
equal slice of every global batch and gradients are averaged, which equals one process on the
global batch because every loss is a batch mean.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm.auto import tqdm

from scope.dictionaries import Dictionary, build
from scope.dictionaries.whitening import Whitening, WhiteningSpec, fit_whitening
from scope.errors import ScopeError, first_line
from scope.files import read_json, read_safetensors
from scope.models import default_device
from scope.store import ActivationStore
from scope.store.fs import replace_folder
from scope.training.config import DictSpec, TrainConfig, load_config
from scope.training.fork import copy_history, plan_fork, renamed_state
from scope.training.logging import MetricLogger
from scope.training.lazy_adam import hold_idle
from scope.training.resample import lift_dead_latents, resample_dead
from scope.training.schedule import lr_at, sparsity_at

CHECKPOINT = "checkpoint"
SNAPSHOTS = "snapshots"  # out/snapshots/step-NNNNNNN/NAME: dictionaries saved along the way (snapshot_every)
CONFIG_COPY = "train_config.yaml"  # marks a folder as a training run


@dataclass
class Trained:
    """One dictionary under training, with its optimiser and firing record."""

    spec: DictSpec
    sae: Dictionary
    opt: torch.optim.Adam
    fire_counts: torch.Tensor  # [blocks, d_sae]: activations per block of steps, a ring over the dead window
    fire_rows: torch.Tensor  # [blocks]: rows seen per block

    @property
    def name(self) -> str:
        return self.spec.label()

    def record(self, counts: torch.Tensor, rows: int, step: int, block_steps: int) -> None:
        """Add one step's per-latent activation counts to the ring of blocks."""
        slot = (step // block_steps) % self.fire_rows.numel()
        if step % block_steps == 0:
            self.fire_counts[slot].zero_()
            self.fire_rows[slot] = 0
        self.fire_counts[slot] += counts.to(self.fire_counts.dtype)
        self.fire_rows[slot] += rows

    def dead_mask(self, frequency: float) -> torch.Tensor | None:
        """Latents active on fewer than ``frequency`` of the window's rows; None until the window has seen
        enough rows (1/frequency) to tell."""
        seen = int(self.fire_rows.sum())
        if frequency <= 0 or seen < 1 / frequency:
            return None
        return self.fire_counts.sum(0).double() / seen < frequency

    def dead_fraction(self, frequency: float) -> float:
        """Fraction of latents active on fewer than ``frequency`` of the rows in the window."""
        freq = self.fire_counts.sum(0).double() / max(int(self.fire_rows.sum()), 1)
        return float((freq < frequency).double().mean()) if frequency > 0 else float((freq == 0).double().mean())


# The firing record is a ring of DEAD_BLOCKS + 1 blocks of ceil(window / DEAD_BLOCKS) steps: the block being
# filled restarts from zero, so the other DEAD_BLOCKS full blocks always cover at least the whole window
# (with a ring of exactly window // DEAD_BLOCKS-step blocks, a window of 98 steps held 81-90, never the
# 1/dead_frequency rows a dead mask needs, and the dead-latent losses silently never ran).
DEAD_BLOCKS = 10


def block_steps_for(window_steps: int) -> int:
    """Steps per block of the firing record's ring for a dead window of ``window_steps``."""
    return max(1, math.ceil(window_steps / DEAD_BLOCKS))


def dead_window_for(batch_size: int, total_steps: int, frequency: float) -> int | None:
    """A dead-latent window for this run: a tenth of it, but at least the 1/frequency rows that can tell a
    latent is dead; None when the run is too short for such a window."""
    window = max(math.ceil(1 / (frequency * batch_size)) if frequency > 0 else 1, total_steps // 10)
    return window if window < total_steps else None


@dataclass
class InputStats:
    """Statistics of a seeded sample of training rows, taken once before training."""

    scale: float  # c = 1/sqrt(E‖x‖²)
    median_norm: float
    mean: torch.Tensor  # E[x], raw units
    sample: torch.Tensor  # the first rows seen (up to 8,192), for data-dependent initialisations


def input_stats(store: ActivationStore, hook: str, rows: int, seed: int,
                transform: Whitening | None = None) -> InputStats:
    """Scale, median norm and mean of up to ``rows`` training rows (after ``transform``, if given)."""
    total, n, norms, mean, sample = 0.0, 0, [], None, None
    for x in store.batches(hook, batch_size=min(rows, 8192), seed=seed + 1, buffer_rows=max(rows, 8192),
                           dtype=torch.float32):
        x = (x if transform is None else transform(x)[0])
        sample = x if sample is None else sample
        x = x.double()
        sq = x.pow(2).sum(-1)
        total += float(sq.sum())
        mean = x.sum(0) if mean is None else mean + x.sum(0)
        n += x.shape[0]
        norms.append(sq.sqrt())
        if n >= rows:
            break
    if n == 0:
        raise ScopeError(f"store {store.url!r} has no training rows for {hook}")
    return InputStats(1.0 / math.sqrt(total / n), float(torch.cat(norms).median()), (mean / n).float(), sample)


def _spec_to_dict_cfg(spec: DictSpec, d_in: int, hook: str, store: ActivationStore,
                      output: tuple[str, int] | None = None) -> dict:
    cfg = {"kind": spec.kind, "d_in": d_in, "d_sae": spec.d_sae, "hook": hook,
           "model": store.manifest.config.model, "store": store.url}
    if spec.apply_b_dec_to_input is not None:
        cfg["apply_b_dec_to_input"] = spec.apply_b_dec_to_input
    if spec.kind == "transcoder":
        cfg.update(activation=spec.activation, skip=spec.skip, output_hook=output[0], d_out=output[1])
    if spec.family() == "jumprelu":
        cfg.update(bandwidth=spec.bandwidth, threshold_init=spec.threshold_init, sparsity_loss=spec.sparsity_loss,
                   tanh_scale=spec.tanh_scale, target_l0=spec.target_l0, pre_act_coeff=spec.pre_act_coeff,
                   pre_act_on=spec.pre_act_on, freq_coeff=spec.freq_coeff, freq_max=spec.freq_max, aux_k=spec.aux_k,
                   batchtopk_steps=spec.batchtopk_steps, row_cap=spec.row_cap)
    if spec.family() == "topk":
        selection = "batch" if spec.activation == "batchtopk" and spec.kind == "transcoder" else spec.selection
        cfg.update(k=spec.k, selection=selection, aux_k=spec.aux_k, aux_b_dec=spec.aux_b_dec,
                   dead_after_tokens=spec.dead_after_tokens, row_cap=spec.row_cap)
    if spec.family() in ("jumprelu", "topk") and spec.aux_coeff is not None:
        cfg["aux_coeff"] = spec.aux_coeff
    if spec.matryoshka_widths is not None:
        cfg["matryoshka_widths"] = spec.matryoshka_widths
    if spec.kind == "icfl":
        cfg.update(iterations=spec.iterations, atoms_per_iteration=spec.atoms_per_iteration,
                   atom_selection=spec.atom_selection, redraw_every=spec.redraw_every, redraw_cos=spec.redraw_cos)
    if spec.whitening is not None:
        cfg["whitening"] = spec.whitening.model_dump()
    return cfg


def control_view(train_view: ActivationStore, spec: WhiteningSpec) -> ActivationStore:
    """The whitening control set: training documents matching the label patterns, or a second store."""
    if not spec.control:
        return train_view
    if len(spec.control) == 1 and spec.control[0].startswith("store:"):
        return ActivationStore(spec.control[0][len("store:"):])
    return train_view.where(spec.control)


def fit_control_whitening(train_view: ActivationStore, hook: str, spec: WhiteningSpec, seed: int) -> Whitening:
    """Fit the whitening of one dictionary on up to ``spec.rows`` rows of its control set."""
    view = control_view(train_view, spec)
    view.check_hook(hook)
    if view.width(hook) != train_view.width(hook):
        raise ScopeError(f"control store {view.url!r} has width {view.width(hook)} at {hook}, but the training "
                         f"store has {train_view.width(hook)}")

    def rows():
        n = 0
        for x in view.batches(hook, batch_size=8192, seed=seed + 7, buffer_rows=max(spec.rows, 8192),
                              dtype=torch.float32):
            yield x[: spec.rows - n]
            n += x.shape[0]
            if n >= spec.rows:
                return

    return fit_whitening(rows(), eps=spec.eps, unit_norm=spec.unit_norm)


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def _dist() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.trainer.device:
        try:
            return default_device(cfg.trainer.device)
        except ScopeError as err:
            raise ScopeError(f"trainer.device: {err}") from None
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def training_batches(view: ActivationStore, cfg: TrainConfig, hooks: list[str],
                     median: float) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless global batches of exactly ``batch_size`` rows in a fixed order, epoch after epoch: one
    ``[batch, width]`` tensor per hook, row for row (a transcoder reads the first and reconstructs the second).

    Each epoch is a fresh shuffle of the view (seed ``trainer.seed + 1000·epoch``); the rows an epoch
    leaves over start the next epoch's first batch, so every row is seen once per epoch and a run of
    ``total_tokens`` = 2.5 × the view's rows sees each row two or three times. Rows whose norm exceeds
    ``max_norm_ratio`` × the median (of the first hook) are dropped when that is set.
    """
    t = cfg.trainer
    epoch, carry = 0, None
    while True:
        seen = 0
        for b in view.rows(hooks, batch_size=t.batch_size, seed=t.seed + 1000 * epoch, buffer_rows=t.buffer_rows):
            xs = [b.acts[h].reshape(b.acts[h].shape[0], -1) for h in hooks]
            if t.max_norm_ratio is not None:
                keep = xs[0].float().norm(dim=-1) <= t.max_norm_ratio * median
                xs = [x[keep] for x in xs]
            seen += xs[0].shape[0]
            xs = xs if carry is None else [torch.cat([c, x]) for c, x in zip(carry, xs)]
            while xs[0].shape[0] >= t.batch_size:
                yield tuple(x[: t.batch_size] for x in xs)
                xs = [x[t.batch_size :] for x in xs]
            carry = xs if xs[0].shape[0] else None
        if seen == 0:
            raise ScopeError(f"store {view.url!r} has no training rows for {hooks[0]} (after max_norm_ratio)")
        epoch += 1


def train(cfg: TrainConfig, out: str | Path, progress: bool = True,
          fork_from: str | Path | None = None) -> dict[str, Path]:
    """Train every dictionary in ``cfg`` and save each to ``out/NAME``; resume from ``out`` if present, else start
    from the checkpoint of the run in ``fork_from`` if given (scope/training/fork.py)."""
    out = Path(out)
    rank, world = _dist()
    t = cfg.trainer
    if rank == 0:
        _check_out(out, cfg)
    store = ActivationStore(cfg.store)
    hook = _config_hook(store, "hook" if cfg.hook and not cfg.input_hook else "input_hook",
                        cfg.input_hook or cfg.hook or _only_hook(store))
    out_hook = _config_hook(store, "output_hook", cfg.output_hook) if cfg.output_hook else None
    output = (out_hook, store.width(out_hook)) if out_hook else None
    d_in = store.width(hook)
    for spec in cfg.dictionaries:
        if spec.d_in is not None and spec.d_in != d_in:
            raise ScopeError(f"store {cfg.store!r} hook {hook} has width {d_in}, but dictionary {spec.label()!r} "
                             f"expects d_in={spec.d_in}; use a store of that width or drop d_in")
    if t.batch_size % world:
        raise ScopeError(f"trainer.batch_size {t.batch_size} must divide evenly among {world} processes")
    train_view, _ = store.split(t.held_out, seed=0)
    stats = input_stats(train_view, hook, t.norm_estimate_rows, t.seed)
    out_stats = input_stats(train_view, out_hook, t.norm_estimate_rows, t.seed) if out_hook else None
    device = _device(cfg)
    if device.type == "cpu":
        reuse_freed_memory()
    block_steps = block_steps_for(t.dead_window_steps)
    total_steps = t.total_tokens // t.batch_size
    if total_steps == 0:
        raise ScopeError(f"trainer.total_tokens {t.total_tokens} is less than one batch ({t.batch_size})")
    revived = [s.label() for s in cfg.dictionaries if s.revives()]
    too_few_rows = t.dead_window_steps * t.batch_size * t.dead_frequency < 1
    # Every latent fires in the first, dense steps, so a window that spans the run never sees one die.
    if revived and (too_few_rows or t.dead_window_steps >= total_steps):
        fit = dead_window_for(t.batch_size, total_steps, t.dead_frequency)
        warnings.warn(f"{', '.join(revived)} set pre_act_coeff or aux_coeff, but a dead window of {t.dead_window_steps} steps "
                      f"({'fewer than the 1/dead_frequency rows that tell a dead latent' if too_few_rows else 'the whole run'}) "
                      "lets it do nothing; "
                      + (f"set trainer.dead_window_steps to {fit}" if fit else "this run is too short for it"),
                      stacklevel=2)

    runs = []
    fitted: dict[str, tuple[Whitening, InputStats]] = {}  # dictionaries with the same whitening share one fit
    for i, spec in enumerate(cfg.dictionaries):
        sae = build(_spec_to_dict_cfg(spec, d_in, hook, store, output))
        sae.reset_parameters(seed=t.seed + i)
        own = stats
        if spec.whitening is not None:
            key = spec.whitening.model_dump_json()
            if key not in fitted:
                white = fit_control_whitening(train_view, hook, spec.whitening, t.seed)
                fitted[key] = white, input_stats(train_view, hook, t.norm_estimate_rows, t.seed, transform=white)
            white, own = fitted[key]
            sae.whitening.load_state_dict(white.state_dict())
        sae.input_scale.fill_(own.scale)
        target = own if out_stats is None else out_stats  # what the decoder reconstructs
        if out_stats is not None:
            sae.output_scale.fill_(out_stats.scale)
        if t.b_dec_init == "mean":
            with torch.no_grad():
                sae.b_dec.copy_(target.mean * target.scale)
        sae.to(device)
        if spec.init_l0 is not None:
            sae.init_thresholds(own.sample, spec.init_l0)
        opt = adam(_param_groups(sae, spec, spec.lr or t.lr), spec.lr or t.lr, spec.adam_betas or t.adam_betas)
        runs.append(Trained(spec, sae, opt, torch.zeros(DEAD_BLOCKS + 1, spec.d_sae, dtype=torch.long,
                                                              device=device),
                            torch.zeros(DEAD_BLOCKS + 1, dtype=torch.long, device=device)))
    if (out / CHECKPOINT).exists():
        start = _resume(out, cfg, runs)
    elif fork_from is not None:
        start = _fork(Path(fork_from), cfg, runs, out, rank)
    else:
        start = 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_COPY).write_text(_yaml(cfg))
    logger = MetricLogger(out, cfg.logging, enabled=rank == 0)
    data = training_batches(train_view, cfg, [hook, out_hook] if out_hook else [hook], stats.median_norm)
    for _ in range(start):  # replay the data order up to the checkpoint: resumed runs see the same batches
        next(data)
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True)
    per_rank = t.batch_size // world
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
    t0 = time.time()
    for step in range(start, total_steps):
        batch = next(data)
        batch = [b[rank * per_rank : (rank + 1) * per_rank] for b in batch] if world > 1 else batch
        x, *rest = [b.to(device, torch.float32, non_blocking=True) for b in batch]
        y = rest[0] if rest else None  # a transcoder's output site
        lr_mult, lam_mult = lr_at(step, total_steps, t), sparsity_at(step, t)
        row = {"step": step + 1, "tokens": (step + 1) * t.batch_size, "lr_mult": lr_mult, "sparsity_mult": lam_mult}
        # A step that resamples or revives is logged too, or its count of latents would be lost.
        logging = ((step + 1) % t.log_every == 0 or step + 1 == total_steps
                   or any(resamples_at(run.spec, step + 1, total_steps, t.lr_decay_start)
                          or (run.spec.handover_revive and step + 1 == run.spec.batchtopk_steps) for run in runs))
        prepared: dict[str, torch.Tensor] = {}  # dictionaries with the same whitening share its output
        for run in runs:
            for group in run.opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mult
            key = run.spec.whitening.model_dump_json() if run.spec.whitening else ""
            if key not in prepared:
                with torch.no_grad():
                    prepared[key] = run.sae.prepare(x)[0]
            xr = prepared[key]
            extra = {"dead": run.dead_mask(t.dead_frequency)} if run.spec.revives() else {}
            if y is not None:
                extra["target"] = y
            if run.spec.batchtopk_steps:
                extra["step"] = step  # a JumpReLU's BatchTopK phase (jumprelu.py)
            with autocast:
                parts = run.sae.loss(xr, run.spec.sparsity_coeff * lam_mult, sparse=t.sparse_kernels, **extra)
            parts.loss.backward()
            if world > 1:
                _average_grads(run.sae, world)
            if run.sae.unit_norm_decoder:
                run.sae.remove_parallel_decoder_grad()
            clip = run.spec.max_grad_norm or t.max_grad_norm
            if clip is not None or logging:
                # Clipping bounds one batch's pull: with Adam's β1 = 0 a gradient far above the running second
                # moment moves each parameter by several learning rates at once. The norm is logged either way.
                grad_norm = torch.nn.utils.clip_grad_norm_(_clipped(run.sae), clip or math.inf)
            restore = hold_idle(run.sae, run.opt) if run.spec.lazy_adam else None
            run.opt.step()
            if restore is not None:
                restore()
            run.opt.zero_grad(set_to_none=True)
            run.sae.project()
            run.sae.after_step(step + 1)
            counts = parts.counts.to(torch.long)
            if world > 1:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            run.record(counts, xr.shape[0] * world, step, block_steps)
            if run.spec.handover_revive and step + 1 == run.spec.batchtopk_steps:
                dead = run.dead_mask(t.dead_frequency)
                if dead is not None:  # the global batch: every rank sets the same θ
                    row[f"{run.name}/revived"] = lift_dead_latents(run.sae, run.opt, _global_rows(xr, world), dead,
                                                                       run.spec.handover_revive)
            if resamples_at(run.spec, step + 1, total_steps, t.lr_decay_start):
                dead = run.dead_mask(t.dead_frequency)
                if dead is not None:  # every rank draws the same rows from the same global batch
                    seed = t.seed * 1_000_003 + step + 1
                    row[f"{run.name}/resampled"] = resample_dead(run.sae, run.opt, _global_rows(xr, world), dead,
                                                                 torch.Generator().manual_seed(seed))
            if logging:
                goal = (xr if y is None else y) * run.sae.reconstruction_scale()
                var = (goal - goal.mean(0)).pow(2).sum(-1).mean()
                mse = float(parts.mse.detach())
                row.update({f"{run.name}/loss": float(parts.loss.detach()), f"{run.name}/mse": mse,
                            f"{run.name}/fvu": mse / float(var), f"{run.name}/l0": float(parts.l0),
                            f"{run.name}/dead": run.dead_fraction(t.dead_frequency),
                            f"{run.name}/grad_norm": float(grad_norm)})
                if parts.aux is not None:
                    row[f"{run.name}/aux"] = float(parts.aux.detach())
        if logging:
            row["tokens_per_s"] = (step + 1 - start) * t.batch_size / max(time.time() - t0, 1e-9)
            logger.log(row)
            first = runs[0].name
            bar.set_postfix(l0=f"{row[f'{first}/l0']:.1f}", fvu=f"{row[f'{first}/fvu']:.3f}")
        bar.update(1)
        if t.snapshot_every and (step + 1) % t.snapshot_every == 0 and step + 1 < total_steps and rank == 0:
            for run in runs:
                _save(run, out / SNAPSHOTS / f"step-{step + 1:07d}" / run.name)
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < total_steps and rank == 0:
            _checkpoint(out, cfg, runs, step + 1)
        if world > 1 and (step + 1) % t.checkpoint_every == 0:
            dist.barrier()
    bar.close()
    logger.close()
    saved = {}
    if rank == 0:
        for run in runs:
            saved[run.name] = _save(run, out / run.name)
        _checkpoint(out, cfg, runs, total_steps)
    if world > 1:
        dist.barrier()
    return saved


def resamples_at(spec: DictSpec, step: int, total_steps: int, decay_start: float) -> bool:
    """Whether ``spec``'s dead latents are resampled after ``step`` (1-based): every ``resample_every`` steps up
    to ``resample_until``, by default the step the learning rate starts to decay (a resampled latent learns
    its feature at the full learning rate)."""
    if not spec.resample_every or step % spec.resample_every:
        return False
    until = spec.resample_until if spec.resample_until is not None else int(decay_start * total_steps)
    return step <= until


def _global_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """The global batch from every rank's slice (the slice itself on one process)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())  # (gloo has no all_gather_into_tensor)
    return torch.cat(parts)


def _save(run: Trained, folder: Path) -> Path:
    """Save for inference; a BatchTopK SAE is saved as the JumpReLU it is at inference (as SAELens does)."""
    sae = run.sae
    if getattr(sae.cfg, "selection", None) == "batch":  # BatchTopK SAEs and transcoders
        sae = sae.as_jumprelu()
    return sae.save(folder)


def _config_hook(store: ActivationStore, key: str, hook: str) -> str:
    """A hook the config names, checked against the store: an error names the key, the hook and the store's hooks."""
    if hook not in store.hooks:
        raise ScopeError(f"the config's {key} {hook!r} is not in store {store.url!r}, which holds {sorted(store.hooks)}; "
                         f"set {key} to one of those or capture a store with it (`scope cache --hooks ...`, or the "
                         f"config's capture: hooks)")
    return hook


def _only_hook(store: ActivationStore) -> str:
    hooks = list(store.hooks)
    if len(hooks) != 1:
        raise ScopeError(f"store {store.url!r} holds several hooks {hooks}; set `input_hook:` (or `hook:`) in the config")
    return hooks[0]


def _average_grads(sae: Dictionary, world: int) -> None:
    for p in sae.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def _yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def _checkpoint(out: Path, cfg: TrainConfig, runs: list[Trained], step: int) -> None:
    """Everything needed to resume, as safetensors + JSON, replaced atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for run in runs:
        for k, v in run.sae.state_dict().items():
            tensors[f"{run.name}/sae/{k}"] = v.detach().cpu().contiguous()
        tensors[f"{run.name}/fire_counts"] = run.fire_counts.cpu()
        tensors[f"{run.name}/fire_rows"] = run.fire_rows.cpu()
        names = {id(p): k for k, p in run.sae.named_parameters()}
        for group in run.opt.param_groups:
            for p in group["params"]:
                for key, val in run.opt.state.get(p, {}).items():
                    tensors[f"{run.name}/adam/{names[id(p)]}/{key}"] = torch.as_tensor(val).detach().cpu().contiguous()

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "config_hash": config_hash(cfg)}))

    replace_folder(out, CHECKPOINT, fill)


def _check_out(out: Path, cfg: TrainConfig) -> None:
    """Train only into an empty or new folder or into a run of this same config (which resumes)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ScopeError(f"--out {str(out)!r} is a file, not a folder; choose a new folder for the run")
    if not (out / CONFIG_COPY).exists():
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise ScopeError(f"--out {str(out)!r} is a non-empty folder that is not a training run (it has no "
                             f"{CONFIG_COPY}); choose an empty or new folder")
        return
    if not (out / CHECKPOINT).exists() and not _same_config(out, cfg):
        raise _other_run(out)


def reuse_freed_memory() -> bool:
    """Keep the memory a step frees in the process for the next step (glibc); False where that cannot be set.

    glibc hands allocations over 32 MiB, and the freed top of its heap, back to the kernel, so every step's
    [d_sae × d_in] gradients and temporaries come back as fresh pages that fault in again: about 9,000 faults a
    step at 16,384 latents. On a virtual machine a fault is slow; measured 2026-12-07 on one thread, batch 4,096,
    they were 150-190 ms of system time in a 1.1 s step, and with this setting 1 fault and 0.94 s
    (docs/benchmarks.md). It turns glibc's mmap allocations and heap trimming off for the rest of the process;
    the cost is a peak RSS about 300 MiB higher at 16,384 latents.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # another C library
        return False


def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """The trainer's optimiser: Adam, fused.

    Fused Adam is one kernel per step instead of a dozen passes over every parameter: on one CPU thread at
    4,096 latents its step takes 3 ms instead of 39 ms, a tenth of x·W_enc (docs/benchmarks.md).
    """
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


def _clipped(sae: Dictionary) -> list[torch.Tensor]:
    """The parameters whose gradient ``max_grad_norm`` clips (and whose norm the log shows): all with a gradient
    but a JumpReLU's trained thresholds, whose pseudo-gradient scales with 1/ε (~50 against ~0.05 for the rest
    at ε 0.002 on Gemma 3 270M), so that in a global norm it would set the clip for every other parameter."""
    theta = sae.trained_threshold()
    return [p for p in sae.parameters() if p.grad is not None and p is not theta]


def _param_groups(sae: Dictionary, spec: DictSpec, lr: float) -> list[dict]:
    """Adam's parameter groups, each with the ``base_lr`` the schedule scales: a JumpReLU's θ gets its own when set.

    With Adam and β1 = 0 every parameter moves by about its learning rate per step whatever its gradient's
    size, and θ is small (~0.015 on Gemma 3 270M in training units), so at lr 1e-3 each step can move it by 7 %
    (docs/methods/sae_quality.md, the 10M study)."""
    trainable = [p for p in sae.parameters() if p.requires_grad]
    if not spec.threshold_lr:
        return [{"params": trainable, "base_lr": lr}]
    theta = sae.trained_threshold()  # a JumpReLU's: the config refuses threshold_lr on any other family
    return [{"params": [p for p in trainable if p is not theta], "base_lr": lr},
            {"params": [theta], "base_lr": spec.threshold_lr}]


def _same_config(out: Path, cfg: TrainConfig) -> bool:
    """Whether the run in ``out`` has ``cfg``, its saved config read with today's defaults: a field that a
    later scope adds, at its default, leaves a run resumable."""
    if (out / CONFIG_COPY).read_text() == _yaml(cfg):
        return True
    try:
        return load_config(out / CONFIG_COPY) == cfg
    except ScopeError:
        return False


def _other_run(out: Path) -> ScopeError:
    return ScopeError(f"{str(out)!r} holds a run with a different config; resume needs the same config "
                      f"(compare with its {CONFIG_COPY}) or choose a new --out")


def _resume(out: Path, cfg: TrainConfig, runs: list[Trained]) -> int:
    restart = f"delete the folder {out / CHECKPOINT} to train from the start, or choose a new --out"
    meta = _checkpoint_meta(out, restart)
    if meta["config_hash"] != config_hash(cfg) and not ((out / CONFIG_COPY).exists() and _same_config(out, cfg)):
        raise _other_run(out)
    _restore_from(out, read_safetensors(out / CHECKPOINT / "state.safetensors", restart), runs, restart)
    return int(meta["step"])


def _checkpoint_meta(run: Path, advice: str) -> dict:
    meta = read_json(run / CHECKPOINT / "state.json", advice)
    if not isinstance(meta, dict) or "config_hash" not in meta or not isinstance(meta.get("step"), int):
        raise ScopeError(f"{run / CHECKPOINT / 'state.json'} is not a scope training checkpoint (needs step and "
                         f"config_hash); {advice}")
    return meta


def _restore_from(run: Path, tensors: dict[str, torch.Tensor], runs: list[Trained], advice: str) -> None:
    try:
        _restore(tensors, runs)
    except (KeyError, RuntimeError) as err:  # a missing tensor, or one of another shape
        raise ScopeError(f"{run / CHECKPOINT / 'state.safetensors'} does not hold this run's state "
                         f"({first_line(err)}); {advice}") from None


def _fork(parent: Path, cfg: TrainConfig, runs: list[Trained], out: Path, rank: int) -> int:
    """Start from ``parent``'s checkpoint (its step, weights, Adam state and firing records) under ``cfg``."""
    advice = "fork from a training run folder with a checkpoint (a --out of `scope train`), or train from the start"
    if not (parent / CONFIG_COPY).exists() or not (parent / CHECKPOINT).is_dir():
        raise ScopeError(f"--fork-from {str(parent)!r} is not a training run with a checkpoint (it needs "
                         f"{CONFIG_COPY} and {CHECKPOINT}/); {advice}")
    meta = _checkpoint_meta(parent, advice)
    plan = plan_fork(parent, load_config(parent / CONFIG_COPY), int(meta["step"]), cfg)
    tensors = read_safetensors(parent / CHECKPOINT / "state.safetensors", advice)
    _restore_from(parent, renamed_state(tensors, plan.names), runs,
                  "the dictionaries there have other shapes than this config's; fork from a run of the same widths")
    if rank == 0:
        copy_history(plan, out, SNAPSHOTS)
        print(f"scope: forked from {plan.parent} at step {plan.step}; config differences: "
              + ("; ".join(plan.differences) or "none"), file=sys.stderr, flush=True)
    return plan.step


def _restore(tensors: dict[str, torch.Tensor], runs: list[Trained]) -> None:
    """Dictionaries, firing records and Adam state from a checkpoint's tensors."""
    device = next(runs[0].sae.parameters()).device
    for run in runs:
        prefix = f"{run.name}/sae/"
        run.sae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        run.fire_counts.copy_(tensors[f"{run.name}/fire_counts"])
        run.fire_rows.copy_(tensors[f"{run.name}/fire_rows"])
        for k, p in run.sae.named_parameters():
            # Fused Adam keeps its step counter with the parameter (unfused Adam, which wrote older checkpoints,
            # on the CPU).
            state = {key.rsplit("/", 1)[1]: v.to(device) for key, v in tensors.items()
                     if key.startswith(f"{run.name}/adam/{k}/")}
            if state:
                run.opt.state[p] = state
