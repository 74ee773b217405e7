"""Where the project's data files live: ``schemas/`` (table and recipe schemas) and ``recipes/``."""

from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"
RECIPES_DIR = REPO_ROOT / "recipes"

if not (SCHEMAS_DIR / "store.yaml").exists():  # a wheel install would leave the data files behind
    raise ImportError(f"engine: {SCHEMAS_DIR} is missing; install the project with `pip install -e .` from its checkout")


def load_yaml(path: Path):
    """A data file of the project, parsed with libyaml's C loader when PyYAML has it (5-10x faster)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def model_identity(model: str) -> str:
    """The name a model's rows are recorded under (captioner, validation model, embeddings model, ...).

    A local folder is named by its absolute, resolved path, so ``models/tiny``, ``./models/tiny`` and
    ``/abs/models/tiny`` are one model and a rerun from another directory finds its rows; a hub id (or any
    name that is not an existing path) is kept as given.
    """
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
