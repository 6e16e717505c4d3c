"""Training: configs, the loop, checkpoints, metrics and plots."""

from zoo.train.checkpoint import (
    CheckpointError,
    is_zoo_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from zoo.train.config import TaskConfig, TrainConfig
from zoo.train.loop import TrainResult, evaluate, train
from zoo.train.metrics import plot_curves, read_jsonl
from zoo.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups

__all__ = [
    "CheckpointError",
    "TaskConfig",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "is_zoo_checkpoint",
    "latest_checkpoint",
    "load_trainer_state",
    "lr_factor",
    "param_groups",
    "plot_curves",
    "read_jsonl",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
