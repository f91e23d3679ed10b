"""Recipes: end-to-end flows built from the components (kept apart from them, as in torchtune)."""
