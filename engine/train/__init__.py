"""``engine train``: fine-tuning on a built mixture (LoRA SFT, JS consistency, PGD on the irrelevant modality)."""

from engine.train.data import MixtureError, read_mixture
from engine.train.trainer import METHODS, TrainConfig, TrainError, train

__all__ = ["METHODS", "MixtureError", "TrainConfig", "TrainError", "read_mixture", "train"]
