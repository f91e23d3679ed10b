"""The training engine: settings, the methods registry and the resumable loop (`fit`).

End-to-end flows (one expert, a multi-stage recipe, a library) are in `moerge.recipes`.
"""

from moerge.train.config import StagedConfig, TrainConfig, load_train_config
from moerge.train.loop import fit
from moerge.train.methods import METHODS, get_method

__all__ = ["METHODS", "StagedConfig", "TrainConfig", "fit", "get_method", "load_train_config"]
