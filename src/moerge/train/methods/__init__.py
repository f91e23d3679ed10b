"""Training methods, one registry: a name maps to how a base model is made trainable and saved.

Adding a method is one `register(...)` call in `builtin.py` (or in your own module).
"""

from moerge.train.methods import builtin as _builtin  # noqa: F401  (these imports register the methods)
from moerge.train.methods import datadriven as _datadriven  # noqa: F401
from moerge.train.methods import mezo as _mezo  # noqa: F401
from moerge.train.methods import mixture as _mixture  # noqa: F401
from moerge.train.methods import partial as _partial  # noqa: F401
from moerge.train.methods.base import METHODS, TrainingMethod, get_method, register

__all__ = ["METHODS", "TrainingMethod", "get_method", "register"]
