"""moerge: train, keep, merge, route and compare fine-tuned experts on one base model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moerge")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

from moerge.errors import MoergeError

__all__ = ["MoergeError", "__version__"]
