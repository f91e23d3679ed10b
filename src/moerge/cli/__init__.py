"""moerge.cli."""
