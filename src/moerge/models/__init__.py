"""Base models: packaged defaults, local folders, hub ids; loading and fingerprints."""

from moerge.models.loading import fingerprint, load_base
from moerge.models.sources import PACKAGED, cached_models, fetch_model, resolve_base

__all__ = ["PACKAGED", "cached_models", "fetch_model", "fingerprint", "load_base", "resolve_base"]
