"""Training methods, one registry: a name maps to how a base model is made trainable and saved.

Adding a method is one `register(...)` call in `builtin.py` (or in your own module).
"""

from moerge.train.methods import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from moerge.train.methods.base import METHODS, TrainingMethod, get_method, register

__all__ = ["METHODS", "TrainingMethod", "get_method", "register"]
