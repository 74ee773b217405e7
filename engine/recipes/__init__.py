"""Recipes: declarative YAML that decides, in SQL over the store, which samples form a training mixture."""

from engine.recipes.build import BuildError, BuildResult, build
from engine.hashing import hash_u64, in_tier, unit_hash
from engine.recipes.mixture import allocate, temperature_weights
from engine.recipes.recipe import Recipe, RecipeError, load_recipe

__all__ = [
    "BuildError", "BuildResult", "Recipe", "RecipeError", "allocate", "build", "hash_u64", "in_tier",
    "load_recipe", "temperature_weights", "unit_hash",
]
