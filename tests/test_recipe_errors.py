"""A bad recipe gives one clear error naming the key (and line), exits non-zero and publishes nothing."""

import textwrap

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.recipes import RecipeError, load_recipe

GOOD = """\
name: ok
where: "split = 'train'"
mixture:
  temperature: 0.5
  budget: 100
output:
  path: {out}
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).replace("{out}", str(tmp_path / "out")))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("temperature: 0.5", "temperature: hot"), ":4: mixture.temperature: expected number, got 'hot'"),
        (GOOD.replace("temperature: 0.5", "temprature: 0.5"), ":4: mixture.temprature: unknown key; allowed here:"),
        (GOOD.replace("temperature: 0.5", "temperature: 1.5"), ":4: mixture.temperature: 1.5 is greater than the maximum of 1"),
        (GOOD + "colour: red\n", ":8: colour: unknown key"),
        (GOOD.replace("  budget: 100\n", ""), ":3: mixture: give exactly one of budget or category_budgets"),
        (GOOD + "redundancy: {level: 0.5}\n", ":8: redundancy: missing required key 'captioner'"),
        (GOOD + "redundancy: {mode: mi_gate, captioner: c}\n", ":8: redundancy: missing required key 'tau'"),
        (GOOD.replace("name: ok", "name: 'has space'"), ":1: name: 'has space' does not match"),
        (GOOD + "output2: 1\n  bad: [\n", ":9: (top level): not valid YAML"),
    ],
)
def test_schema_errors_name_line_and_key(tmp_path, text, expected):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, text))
    assert expected in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "recipe.yaml"))


def test_override_errors_point_at_the_override(tmp_path):
    with pytest.raises(RecipeError, match=r"\(--set\): mixture.budget: expected integer or 'all', got 'lots'"):
        load_recipe(write(tmp_path, GOOD), ["mixture.budget=lots"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(write(tmp_path, GOOD), ["mixture.budget"])


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("split = 'train'", "splitt = 'train'"), "recipe.yaml:2: where: invalid SQL: Binder Error"),
        (GOOD.replace("split = 'train'", "split = = 'train'"), "recipe.yaml:2: where: invalid SQL: Parser Error"),
        (GOOD.replace("  budget: 100\n", "  category_budgets: {Memes: 5}\n"), "mixture.category_budgets: unknown categories ['Memes']"),
        (GOOD + "facts: {embeddings: {model: x}}\n", "facts: cannot pin ['embeddings']"),
        (GOOD + "facts: {validation: {modle: x}}\n", "facts.validation: no column 'modle'"),
    ],
)
def test_errors_found_against_the_store_exit_nonzero_and_publish_nothing(sample_store, tmp_path, text, expected):
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "build", str(path)])
    assert result.exit_code == 2
    assert expected in result.output
    assert result.output.startswith("error: ")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


def test_a_good_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.mixture == {"group_by": "category", "temperature": 0.5, "category_temperature": 1.0, "budget": 100}
    assert recipe.output["formats"] == ["parquet", "hf"]
    assert recipe.redundancy is None and recipe.seed == 0


def test_shipped_recipes_validate():
    from engine.paths import RECIPES_DIR

    data_files = {"categories.yaml", "prompts.yaml", "facts.yaml"}
    names = sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if p.name not in data_files)
    assert {"cauldron_r0.yaml", "cauldron_r25.yaml", "cauldron_r50.yaml", "easy_vqa_mi_gate.yaml", "val_ppl_clean_25.yaml",
            "cauldron_interference.yaml"} <= set(names)
    for name in names:
        load_recipe(RECIPES_DIR / name)
    r25, r50 = load_recipe(RECIPES_DIR / "cauldron_r25.yaml"), load_recipe(RECIPES_DIR / "cauldron_r50.yaml")
    assert r25.mixture["budget"] == r50.mixture["budget"] == 984_000
    assert r25.mixture["temperature"] == 0.5 and r25.redundancy["level"] == 0.25 and r50.redundancy["level"] == 0.5
    assert r25.redundancy["salt"] == r50.redundancy["salt"]  # same salt: the 50% tier contains the 25% tier
