"""Build hook: a wheel carries the top-level ``recipes/`` and ``schemas/`` folders as ``engine/_data/``.

The checkout keeps one copy of each file where users and the README expect it (``engine build
recipes/cauldron_r50.yaml``); building a wheel copies them into the package, and ``engine.paths`` reads
the packaged copy when there is one. Everything else is declared in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("recipes", "schemas")


class build_py_with_data(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for folder in DATA_FOLDERS:
            target = Path(self.build_lib) / "engine" / "_data" / folder
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(root / folder, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": build_py_with_data})
