"""Typed recipes: schema, YAML loading, overrides and validation (no torch needed)."""

from dist_ft.config.errors import ConfigError
from dist_ft.config.load import apply_overrides, load_recipe, recipe_to_dict, validate_recipe
from dist_ft.config.schema import Recipe, Rule

__all__ = [
    "ConfigError",
    "Recipe",
    "Rule",
    "apply_overrides",
    "load_recipe",
    "recipe_to_dict",
    "validate_recipe",
]
