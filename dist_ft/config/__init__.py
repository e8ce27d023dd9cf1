"""Typed recipes: schema, YAML loading, overrides and validation (no torch needed)."""

from dist_ft.config.errors import ConfigError
from dist_ft.config.load import apply_overrides, load_recipe, recipe_to_dict, validate_recipe
from dist_ft.config.schema import Recipe, Rule
from dist_ft.config.shipped import (
    resolve_recipe,
    resolve_sweep,
    shipped_launch_configs,
    shipped_recipes,
    shipped_sweeps,
)

__all__ = [
    "ConfigError",
    "Recipe",
    "Rule",
    "apply_overrides",
    "load_recipe",
    "recipe_to_dict",
    "resolve_recipe",
    "resolve_sweep",
    "shipped_launch_configs",
    "shipped_recipes",
    "shipped_sweeps",
    "validate_recipe",
]
