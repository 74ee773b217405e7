"""Recipe defaults live in one place (the schema's `default`s, filled by the loader), and the manifest's
recipe hash covers the effective recipe, defaults included."""

import copy
import json

import pytest

from engine.recipes import load_recipe
from engine.recipes import recipe as recipe_module

BASE = "name: t\nmixture: {budget: 10}\noutput: {path: out}\n"
PERTURB = "perturb: {image_heavy: {misleading: 0.5}}\n"


def load(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_recipe(path)


def test_the_effective_recipe_spells_out_every_default(tmp_path):
    effective = load(tmp_path, BASE + PERTURB + "redundancy: {mode: mi_gate, tau: 0.5, captioner: c}\n").effective()
    assert effective["seed"] == 0 and effective["answers"] == "original"
    assert effective["mixture"] == {"budget": 10, "group_by": "category", "temperature": 0.5, "category_temperature": 1.0}
    assert effective["perturb"] == {"image_heavy": {"misleading": 0.5}, "facts": 3, "salt": "perturb"}
    assert effective["redundancy"] == {"mode": "mi_gate", "tau": 0.5, "captioner": "c", "basis": "dataset", "prefix": "",
                                       "on_missing": "fail", "salt": "redundancy-tier"}
    assert effective["output"] == {"formats": ["parquet", "hf"], "shard_rows": 50000}
    # basis is an mi_gate setting: a tier recipe does not carry it
    tier = load(tmp_path, BASE + "redundancy: {level: 0.5, captioner: c}\n", "tier.yaml").effective()["redundancy"]
    assert "basis" not in tier and tier["mode"] == "tier"


def test_writing_a_default_out_does_not_change_the_hash(tmp_path):
    implicit = load(tmp_path, BASE + PERTURB, "a.yaml")
    explicit = load(tmp_path, BASE + "answers: original\nseed: 0\n"
                    "perturb: {image_heavy: {misleading: 0.5}, facts: 3, salt: perturb}\n", "b.yaml")
    assert implicit.sha256() == explicit.sha256()
    assert load(tmp_path, BASE + "answers: corrupted\n", "c.yaml").sha256() != load(tmp_path, BASE, "d.yaml").sha256()


@pytest.mark.parametrize("path, value", [(("perturb", "facts"), 4), (("perturb", "salt"), "other"), (("answers",), "corrupted")])
def test_a_changed_default_changes_the_hash_and_the_build(tmp_path, monkeypatch, path, value):
    recipe = load(tmp_path, BASE + PERTURB)
    before = recipe.sha256()
    schema = copy.deepcopy(recipe_module.recipe_schema())
    node = schema["properties"][path[0]]
    for key in path[1:]:
        node = node["properties"][key]
    node["default"] = value
    monkeypatch.setattr(recipe_module, "recipe_schema", lambda: schema)
    assert recipe.sha256() != before
    filled = recipe.effective()
    for key in path:
        filled = filled[key]
    assert filled == value  # what the build reads (recipe.perturb / recipe.answers) is what was hashed


def test_no_default_is_written_twice():
    """The build and the loader take defaults from the schema only: their sources hold no literal default."""
    import inspect

    from engine.recipes import build

    source = inspect.getsource(build) + inspect.getsource(recipe_module)
    for literal in ('get("facts", 3)', 'get("salt", "perturb")', 'get("answers", "original")', '"basis": "mixture"',
                    '"shard_rows": 50000', 'get("seed", 0)'):
        assert literal not in source
    schema = json.loads((recipe_module.SCHEMAS_DIR / "recipe.schema.json").read_text())
    assert schema["properties"]["perturb"]["properties"]["facts"]["default"] == 3
