"""moerge.route."""
