"""Recipes: TOML files that run the whole pipeline (``python -m compress.recipe NAME``)."""

from .config import Recipe, list_recipes, load_recipe
from .runner import RecipeRun, run_recipe

__all__ = ["Recipe", "RecipeRun", "list_recipes", "load_recipe", "run_recipe"]
