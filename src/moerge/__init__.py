"""moerge: train, keep, merge, route and compare fine-tuned experts on one base model."""

from typing import Any

from moerge._version import __version__
from moerge.errors import MoergeError


def load_routed(base: Any, router: Any, **kwargs: Any) -> Any:
    """A transformers model with a router's experts attached: `moerge.load_routed(base, router)`."""
    from moerge.route import load_routed as _load_routed

    return _load_routed(base, router, **kwargs)


__all__ = ["MoergeError", "__version__", "load_routed"]
