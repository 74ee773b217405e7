"""Where the project's data files live: ``schemas/`` (table and recipe schemas) and ``recipes/``.

A checkout (and an editable install) reads them where they are, at the top of the repository. A wheel
carries copies of the same two folders inside the package, as ``engine/_data/`` (``setup.py`` copies them
at build time), so there is one source of truth and ``pip install .`` works without a checkout.
"""

from pathlib import Path

import yaml

DEFAULT_STORE = "data/store"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
_PACKAGED = PACKAGE_DIR / "_data"
DATA_ROOT = _PACKAGED if (_PACKAGED / "schemas" / "store.yaml").exists() else REPO_ROOT
SCHEMAS_DIR = DATA_ROOT / "schemas"
RECIPES_DIR = DATA_ROOT / "recipes"

if not (SCHEMAS_DIR / "store.yaml").exists():
    raise ImportError(f"engine: {SCHEMAS_DIR} is missing; install the project with `pip install .` from its checkout")


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
