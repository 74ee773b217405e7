"""The subset -> (category, task kind) mapping kept as data in ``recipes/categories.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


from engine.paths import RECIPES_DIR, load_yaml


@dataclass(frozen=True)
class SubsetInfo:
    category: str
    task_kind: str


@cache
def _mapping() -> dict:
    return load_yaml(RECIPES_DIR / "categories.yaml")


def categories() -> list[str]:
    """The seven categories, in the paper's order."""
    return list(_mapping()["categories"])


def subset_mapping() -> dict[str, SubsetInfo]:
    """Each known subset's category and task kind."""
    return {name: SubsetInfo(**info) for name, info in _mapping()["subsets"].items()}
