"""Training metrics to a JSONL file, and to TensorBoard or wandb when installed and asked for."""

from __future__ import annotations

import json
from pathlib import Path

from scope.training.config import LoggingSettings

METRICS = "metrics.jsonl"


class MetricLogger:
    """Appends one JSON object per logged step to ``out/metrics.jsonl``."""

    def __init__(self, out: Path, settings: LoggingSettings, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = (out / METRICS).open("a")
        if settings.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("scope: tensorboard is not installed; logging to metrics.jsonl only", flush=True)
        if settings.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=settings.wandb_project, dir=str(out))
            except ImportError:
                print("scope: wandb is not installed; logging to metrics.jsonl only", flush=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def last_metrics(out: str | Path) -> dict:
    """The last row a run folder's ``metrics.jsonl`` holds; empty when it has none."""
    path = Path(out) / METRICS
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}
