"""SAELens side of benchmarks/saelens_quality.py: train SAELens's JumpReLU on the rows scope trained on, with a recipe
from SAELens's own training guide, and save it in SAELens's inference layout.

Runs inside the SAELens virtual environment (benchmarks/saelens_venv.sh) and never imports scope.
benchmarks/saelens_quality.py writes ROWS/ with ``meta.json`` (``batch``, ``steps``, ``d_in``, ``mean_norm``,
``chunks``) and the chunk files (safetensors, ``x`` [rows, d_in] float32): exactly the batches, in order, that
scope's trainer read. SAELens's own ``SAETrainer.fit`` trains on them (its loop, schedulers, firing statistics
and, at the end, the folding of the input scaling into the weights). Its ``expected_average_only_in``
normalisation scales inputs by sqrt(d_in) / E‖x‖; the factor is set from ``mean_norm`` (the mean over all the
rows) instead of letting ``fit`` estimate it from batches it would take out of the training stream.

Recipes (SAELens 6.x docs, "Training JumpReLU SAEs"):

* ``tanh``: the recommended one, Anthropic's setup — tanh sparsity loss (scale 4), l0_coefficient 5
  (``--l0-coeff``: the guide's examples use 5; it sets the L0 the run ends at),
  bandwidth 2, initial threshold 0.1, pre-activation loss 3e-6, the L0 coefficient warmed up over the whole
  run, the learning rate decayed over the last 20 %;
* ``quadratic``: Gemma Scope 2's quadratic L0 loss with ``target_l0``, l0_coefficient 5, bandwidth 0.01,
  initial threshold 0.01.

Everything else is SAELens's default (lr 3e-4, Adam β = (0.9, 0.999), decoder init norm 0.1, b_dec applied
to the input). Usage (normally called by saelens_quality.py):

    /work/saelens-venv/bin/python benchmarks/saelens_quality_side.py --rows ROWS --recipe tanh --d-sae 4096 \
        --hook blocks.6.hook_resid_post --out FOLDER [--target-l0 60] [--l0-coeff 5] [--threads 1]

Prints one JSON object (wall time, final training-batch L0) on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file


def batches(rows: Path, meta: dict) -> Iterator[torch.Tensor]:
    """The training batches in scope's order, a chunk file at a time."""
    for name in meta["chunks"]:
        x = load_file(str(rows / name))["x"]
        for i in range(0, x.shape[0], meta["batch"]):
            yield x[i : i + meta["batch"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True)
    p.add_argument("--recipe", choices=("tanh", "quadratic"), required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--hook", required=True)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--target-l0", type=float, default=60.0)
    p.add_argument("--l0-coeff", type=float, default=5.0, help="l0_coefficient (the guide's examples use 5)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    rows = Path(args.rows)
    meta = json.loads((rows / "meta.json").read_text())
    steps, batch, d_in = meta["steps"], meta["batch"], meta["d_in"]
    common = {"d_in": d_in, "d_sae": args.d_sae, "dtype": "float32", "device": "cpu",
              "normalize_activations": "expected_average_only_in", "l0_coefficient": args.l0_coeff}
    if args.recipe == "tanh":
        sae_cfg = JumpReLUTrainingSAEConfig(**common, jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=4.0,
                                            jumprelu_bandwidth=2.0, jumprelu_init_threshold=0.1,
                                            pre_act_loss_coefficient=3e-6, l0_warm_up_steps=steps)
        decay = steps // 5
    else:
        sae_cfg = JumpReLUTrainingSAEConfig(**common, jumprelu_sparsity_loss_mode="quadratic", target_l0=args.target_l0,
                                            jumprelu_bandwidth=0.01, jumprelu_init_threshold=0.01)
        decay = 0
    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(sae_cfg)
    lr = 3e-4
    trainer = SAETrainer(
        cfg=SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr,
                             lr_end=lr / 10, lr_decay_steps=decay, device="cpu"),
        sae=sae, data_provider=batches(rows, meta))
    trainer.activation_scaler.scaling_factor = d_in**0.5 / meta["mean_norm"]
    recipe = {k: v for k, v in vars(sae_cfg).items() if isinstance(v, (int, float, str, type(None)))}

    t0 = time.perf_counter()
    trained = trainer.fit()  # folds the scaling factor into the weights at the end
    wall = time.perf_counter() - t0

    trained.cfg.metadata.hook_name = args.hook
    trained.cfg.metadata.model_name = args.model
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    trained.save_inference_model(tmp)
    result = {"library": "sae-lens", "version": sae_lens.__version__, "recipe": args.recipe, "steps": steps,
              "batch": batch, "token_steps": steps * batch, "wall_s": wall, "threads": torch.get_num_threads(),
              "sae_cfg": recipe,
              "lr": lr, "lr_decay_steps": decay, "scaling_factor": d_in**0.5 / meta["mean_norm"]}
    # training.json marks a finished run, so it goes in before the folder takes its final name
    (tmp / "training.json").write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
