"""`moerge serve`: the base model, every library expert and the given routers behind one
OpenAI-compatible HTTP API (`create_app`), with prompts rendered in each model's prompt format."""

from moerge.serve.app import create_app
from moerge.serve.models import ModelPool

__all__ = ["ModelPool", "create_app"]
