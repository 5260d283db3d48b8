"""SAELens side of benchmarks/sae_train.py: train SAELens's own JumpReLU training SAE on a fixed file of rows.

Runs inside the SAELens virtual environment (benchmarks/saelens_venv.sh) and never imports scope.
benchmarks/sae_train.py writes one safetensors file with

* ``x``        [rows, d_in] float32 — raw activation rows, consumed in order, ``batch`` rows per step;
* ``x_eval``   [batch, d_in] float32 — held-out rows for the final FVU and L0;
* ``input_scale`` [] — c = 1/sqrt(E‖x‖²) over ``x``; SAELens is fed c·x (pre-scaled, so its
  ``normalize_activations`` stays "none" and both libraries see identical numbers);
* ``init.W_enc``, ``init.b_enc``, ``init.W_dec``, ``init.b_dec``, ``init.threshold`` — the starting
  weights, the same for both libraries.

The model is ``sae_lens.saes.jumprelu_sae.JumpReLUTrainingSAE`` (threshold trained directly, rectangle-kernel
STE, "step" L0 loss, no b_dec subtracted from the input) and every step is SAELens's own
``SAETrainer.step`` — the public per-step seam its ``fit()`` loop calls: training_forward_pass under the
trainer's autocast context (``SAETrainerConfig.autocast=True`` for bf16, i.e. SAELens's own
``torch.autocast(device, bfloat16)``), its firing statistics, backward, ``clip_grad_norm_(…, 1.0)``,
Adam(β=(0, 0.999)), the (constant) lr and coefficient schedulers. SAELens 6.x keeps the decoder rows' norms
free while training (no projection) — that is its decoder-norm handling, left as is.

Usage (normally called by sae_train.py):
    /work/saelens-venv/bin/python benchmarks/saelens_train_side.py --data FILE --warmup 2 --steps 6 --batch 4096 \
        --lr 7e-5 --l0-coeff 3e-3 [--bf16] [--threads N] [--device cpu]
Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from safetensors.torch import load_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--l0-coeff", type=float, required=True)
    p.add_argument("--bandwidth", type=float, default=0.001)
    p.add_argument("--threshold-init", type=float, default=0.001)
    p.add_argument("--bf16", action="store_true", help="SAETrainerConfig.autocast=True (bf16 autocast)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    device = torch.device(args.device)
    data = load_file(args.data)
    c = data["input_scale"].float()
    x = (data["x"].float() * c).to(device)  # pre-scaled once, outside the timed steps
    x_eval = (data["x_eval"].float() * c).to(device)
    d_in, d_sae = data["init.W_enc"].shape
    n_steps = args.warmup + args.steps
    if x.shape[0] < n_steps * args.batch:
        raise SystemExit(f"{args.data} holds {x.shape[0]} rows, need {n_steps * args.batch}")
    rss_before = _rss_mb()

    cfg = JumpReLUTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, dtype="float32", device=args.device, apply_b_dec_to_input=False,
        normalize_activations="none", jumprelu_init_threshold=args.threshold_init,
        jumprelu_bandwidth=args.bandwidth, jumprelu_sparsity_loss_mode="step", l0_coefficient=args.l0_coeff,
        l0_warm_up_steps=0, decoder_init_norm=1.0,
    )
    sae = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(sae, name).copy_(data[f"init.{name}"])
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=n_steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
            lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=args.lr_warmup_steps, adam_beta1=0.0,
            adam_beta2=0.999, device=args.device, autocast=args.bf16,
        ),
        sae=sae,
        data_provider=iter(()),  # unused: we call trainer.step on our own batches
    )
    sae.to(device)

    times, last = [], None
    for i in range(n_steps):
        batch = x[i * args.batch : (i + 1) * args.batch]
        _sync(device)
        t = time.perf_counter()
        out = trainer.step(batch)
        trainer.n_training_steps += 1  # as SAETrainer.fit does after each step
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        if i == n_steps - 1:
            with torch.no_grad():
                xin = out.sae_in.float()
                last = {"train_fvu": float(out.losses["mse_loss"].float()) / _var(xin),
                        "train_l0": float((out.feature_acts != 0).float().sum(-1).mean())}
        del out

    with torch.no_grad():  # final metrics in float32 on held-out rows, with SAELens's own encode/decode
        sae.eval()
        recon = sae.decode(sae.encode(x_eval))
        fvu = float((recon - x_eval).pow(2).sum(-1).mean()) / _var(x_eval)
        l0 = float((sae.encode(x_eval) != 0).float().sum(-1).mean())
    peak = _peak_mb(device)
    print(json.dumps({
        "library": "sae-lens", "version": sae_lens.__version__, "torch": torch.__version__,
        "class": type(sae).__name__,
        "autocast": "SAETrainerConfig.autocast (torch.autocast bf16)" if args.bf16 else None,
        "threads": torch.get_num_threads(), "step_times_s": times, "median_step_s": statistics.median(times),
        "mean_step_s": statistics.fmean(times), "tokens_per_s": args.batch / statistics.median(times),
        "fvu": fvu, "l0": l0, **last, "peak_rss_mb": peak["rss"], "rss_before_model_mb": rss_before,
        "peak_device_mb": peak.get("device"),
        "decoder_row_norm_mean": float(sae.W_dec.detach().norm(dim=1).mean()),
    }))


def _var(x: torch.Tensor) -> float:
    """Mean over rows of ‖x − mean(x)‖²: FVU = mean ‖x − x̂‖² / this."""
    return float((x - x.mean(0)).pow(2).sum(-1).mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it does not inherit the parent's peak via exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _peak_mb(device: torch.device) -> dict:
    out = {"rss": _hwm_mb()}
    if device.type == "cuda":
        out["device"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


if __name__ == "__main__":
    main()
