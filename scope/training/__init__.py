"""SAE training: configs (config.py), the loop with checkpoints and DDP (trainer.py), metric logs."""

from scope.training.config import DictSpec, TrainConfig, TrainerSettings, load_config
from scope.training.trainer import train

__all__ = ["DictSpec", "TrainConfig", "TrainerSettings", "load_config", "train"]
