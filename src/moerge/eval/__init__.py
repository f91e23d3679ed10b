"""Evaluation: task scoring now; held-in/held-out/forgetting comparisons build on it."""

from moerge.eval.evaluate import evaluate_task

__all__ = ["evaluate_task"]
