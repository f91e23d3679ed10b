"""Tasks: loaders for files, HF datasets folders, reasoning-gym and BIG-bench; prompts; splits."""

from moerge.data.loaders import load_task
from moerge.data.task import Example, Task, exact_match, split_examples

__all__ = ["Example", "Task", "exact_match", "load_task", "split_examples"]
