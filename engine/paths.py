"""Where the project's data files live: ``schemas/`` (table and recipe schemas) and ``recipes/``."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"
RECIPES_DIR = REPO_ROOT / "recipes"

if not (SCHEMAS_DIR / "store.yaml").exists():  # a wheel install would leave the data files behind
    raise ImportError(f"engine: {SCHEMAS_DIR} is missing; install the project with `pip install -e .` from its checkout")
