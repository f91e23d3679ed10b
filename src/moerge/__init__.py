"""moerge: train, keep, merge, route and compare fine-tuned experts on one base model."""

from typing import Any

from moerge.errors import MoergeError


def __getattr__(name: str) -> Any:
    """`moerge.__version__`, read from the installed metadata only when asked (importlib.metadata is slow
    to import, and every command imports this package before it can catch a Ctrl-C)."""
    if name == "__version__":
        from moerge._version import __version__

        return __version__
    raise AttributeError(f"module 'moerge' has no attribute {name!r}")


def load_routed(base: Any, router: Any, **kwargs: Any) -> Any:
    """A transformers model with a router's experts attached: `moerge.load_routed(base, router)`."""
    from moerge.route import load_routed as _load_routed

    return _load_routed(base, router, **kwargs)


__all__ = ["MoergeError", "__version__", "load_routed"]
