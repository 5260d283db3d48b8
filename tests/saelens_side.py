"""Run inside a separate virtual environment that has sae-lens (never imports scope).

tests/test_interop.py calls ``python saelens_side.py JOBS.json``. Each job either loads a folder with SAELens's
own loader (``op: load``) or makes a random SAELens SAE and saves it with SAELens's own ``save_model``
(``op: make``); both then encode/decode the fixed input and write codes and reconstructions to a
safetensors file, plus a JSON line with what SAELens built.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def make(job: dict):
    """A SAELens SAE of ``job['arch']`` with random weights, saved with save_model."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    classes = {"jumprelu": (JumpReLUSAE, JumpReLUSAEConfig), "standard": (StandardSAE, StandardSAEConfig),
               "topk": (TopKSAE, TopKSAEConfig)}
    sae_cls, cfg_cls = classes[job["arch"]]
    meta = SAEMetadata(hook_name=job["hook"], model_name=job["model"])
    cfg = cfg_cls(d_in=job["d_in"], d_sae=job["d_sae"], apply_b_dec_to_input=job["apply_b_dec_to_input"],
                  metadata=meta, **job.get("fields", {}))
    sae = sae_cls(cfg)
    g = torch.Generator().manual_seed(job["seed"])
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name == "b_enc" else 0.5))
        if job["arch"] == "jumprelu":
            theta = torch.rand(job["d_sae"], generator=g) * 0.5
            n = job.get("nonpositive_thresholds", 0)
            theta[: n // 2] = 0.0  # SAELens's own initial value
            theta[n // 2 : n] = -0.3  # below zero SAELens's relu(z)·1[z > θ] is plain ReLU
            sae.threshold.copy_(theta)
    sae.save_model(job["folder"])
    return sae


def main() -> None:
    import sae_lens
    from sae_lens import SAE

    jobs = json.loads(open(sys.argv[1]).read())
    for job in jobs:
        sae = make(job) if job["op"] == "make" else SAE.load_from_disk(job["folder"])
        x = load_file(job["x"])["x"]
        with torch.no_grad():
            codes = sae.encode(x)
            recon = sae.decode(codes)
            out = sae(x)
            out = out[0] if isinstance(out, tuple) else out  # some SAELens transcoders return (output, codes)
        save_file({"codes": codes.contiguous(), "recon": recon.contiguous(), "forward": out.contiguous()}, job["out"])
        print(json.dumps({"name": job["name"], "class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                          "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
                          "hook_name": sae.cfg.metadata.hook_name, "model_name": sae.cfg.metadata.model_name,
                          "sae_lens_version": sae_lens.__version__}))


if __name__ == "__main__":
    main()
