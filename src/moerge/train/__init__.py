"""Training experts: settings, the methods registry and the resumable loop."""

from moerge.train.config import TrainConfig, load_recipe
from moerge.train.loop import train_expert
from moerge.train.methods import METHODS, get_method

__all__ = ["METHODS", "TrainConfig", "get_method", "load_recipe", "train_expert"]
