"""SAE training: configs (config.py), the loop with checkpoints and DDP (trainer.py), its schedules (schedule.py),
forking a run from another's checkpoint (fork.py), dead latents brought back (resample.py), metric logs
(logging.py), and capturing a config's store when it is missing (store.py)."""

from scope.training.config import DictSpec, TrainConfig, TrainerSettings, load_config
from scope.training.logging import last_metrics
from scope.training.store import ensure_store
from scope.training.trainer import train

__all__ = ["DictSpec", "TrainConfig", "TrainerSettings", "ensure_store", "last_metrics", "load_config", "train"]
