"""Loading and validating recipes (YAML, checked against ``schemas/recipe.schema.json``).

Every error names the file, the line, the key and what was expected, e.g.
``recipes/x.yaml:7: mixture.temperature: expected number, got 'hot'``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from engine.paths import SCHEMAS_DIR
from engine.sql import WhereError, check_expression


class RecipeError(ValueError):
    """A recipe that cannot be built: one line naming where and what."""

    def __init__(self, where: str, key: str, message: str):
        self.where, self.key, self.message = where, key, message
        super().__init__(f"{where}: {key or '(top level)'}: {message}")


@cache
def recipe_schema() -> dict:
    return json.loads((SCHEMAS_DIR / "recipe.schema.json").read_text())


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """1-based line of every key (and list item) in a composed YAML document."""
    lines = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines.update(_key_lines(value, path))
            lines[path] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_key_lines(item, prefix + (index,)))
    return lines


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


@dataclass
class Recipe:
    """A validated recipe: ``data`` is the YAML with ``--set`` overrides applied, ``lines`` maps key paths
    to line numbers (``--set`` keys map to 0)."""

    data: dict
    path: str
    lines: dict[tuple, int] = field(default_factory=dict)
    overridden: set[tuple] = field(default_factory=set)

    def error(self, key_path: tuple | str, message: str) -> RecipeError:
        path = tuple(key_path.split(".")) if isinstance(key_path, str) else tuple(key_path)
        if path in self.overridden:
            where = f"{self.path} (--set)"
        else:
            probe = path
            while probe and probe not in self.lines:
                probe = probe[:-1]
            where = f"{self.path}:{self.lines.get(probe, 1)}"
        return RecipeError(where, _dotted(path), message)

    # -- the recipe with its defaults filled in -----------------------------------------------------
    @property
    def filled(self) -> dict:
        """``data`` with every absent key that has a ``default`` in the schema filled in (the one place
        recipe defaults live: ``schemas/recipe.schema.json``)."""
        return with_defaults(recipe_schema(), self.data)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def seed(self) -> int:
        return self.filled["seed"]

    @property
    def where(self) -> str | None:
        return self.data.get("where")

    @property
    def mixture(self) -> dict:
        return self.filled["mixture"]

    @property
    def redundancy(self) -> dict | None:
        return self.filled.get("redundancy")

    @property
    def perturb(self) -> dict | None:
        return self.filled.get("perturb")

    @property
    def answers(self) -> str:
        return self.filled["answers"]

    @property
    def output(self) -> dict:
        return self.filled["output"]

    def effective(self) -> dict:
        """The recipe as built: every default spelled out (what the manifest records and hashes).
        ``output.path`` is left out: where a mixture is written does not change what it is."""
        data = self.filled
        data["output"] = {k: v for k, v in data["output"].items() if k != "path"}
        return data

    def sha256(self) -> str:
        text = json.dumps(self.effective(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def with_defaults(schema: dict, value):
    """A copy of ``value`` with the schema's ``default``s filled in wherever a key is absent, recursing into
    ``properties``, ``additionalProperties`` and the branch an ``if``/``then``/``else`` takes."""
    if not isinstance(value, dict) or not isinstance(schema, dict):
        return copy.deepcopy(value)
    properties = schema.get("properties", {})
    out = {key: copy.deepcopy(sub["default"]) for key, sub in properties.items() if key not in value and "default" in sub}
    extra = schema.get("additionalProperties")
    for key, item in value.items():
        sub = properties.get(key, extra if isinstance(extra, dict) else None)
        out[key] = with_defaults(sub, item) if sub is not None else copy.deepcopy(item)
    for branch in schema.get("allOf", []):
        if "if" in branch:
            taken = branch.get("then" if jsonschema.Draft202012Validator(branch["if"]).is_valid(out) else "else")
            out = with_defaults(taken, out) if taken else out
        else:
            out = with_defaults(branch, out)
    return out


def _apply_override(data: dict, assignment: str) -> tuple:
    if "=" not in assignment:
        raise RecipeError("--set", assignment, "expected KEY=VALUE, e.g. mixture.budget=2000")
    key, _, raw_value = assignment.partition("=")
    path = tuple(key.strip().split("."))
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise RecipeError("--set", key, f"value is not valid YAML ({error})") from None
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError("--set", key, f"{part!r} is not a mapping")
    node[path[-1]] = value
    return path


def _describe(error: jsonschema.ValidationError) -> tuple[tuple, str]:
    """The key path and a sentence for a person, from a JSON Schema error."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        return path + (unexpected[0],), f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
    if error.validator == "required":
        return path, f"missing required key {error.message.split(' is a required')[0]}"
    if error.validator == "type":
        return path, f"expected {error.validator_value}, got {error.instance!r}"
    if error.validator == "enum":
        return path, f"expected one of {error.validator_value}, got {error.instance!r}"
    if error.validator in ("oneOf", "anyOf"):
        requireds = [s.get("required") for s in error.validator_value]
        if all(requireds):
            names = " or ".join(r[0] for r in requireds)
            return path, f"give exactly one of {names}"
        options = [repr(o["const"]) if "const" in o else o.get("type", "?") for o in error.validator_value]
        return path, f"expected {' or '.join(options)}, got {error.instance!r}"
    if error.validator == "const":
        return path, f"expected {error.validator_value!r}, got {error.instance!r}"
    return path, error.message


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Raises
    ------
    RecipeError
        The first problem found, naming the line and key.
    """
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise RecipeError(path, "", f"cannot read the recipe ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}", "", f"not UTF-8 text (byte 0x{raw[error.start]:02x}); save the recipe as UTF-8") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{path}:{line}", "", f"not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1", "", "a recipe is a YAML mapping of keys (name, mixture, output, ...)")
    recipe = Recipe(data=data, path=path, lines=_key_lines(node) if node is not None else {})
    for assignment in overrides:
        recipe.overridden.add(_apply_override(data, assignment))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(recipe_schema()).iter_errors(data))
    if error is not None:
        key, message = _describe(error)
        raise recipe.error(key, message)
    for key, value in _leaves(data):
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan / .inf pass "type: number"
            raise recipe.error(key, f"expected a finite number, got {value!r}")
    for key in SQL_KEYS:
        expression = _get(data, key)
        if expression is not None:
            try:
                check_expression(expression)
            except WhereError as error:
                raise recipe.error(key, str(error)) from None
    return recipe


SQL_KEYS = (("where",), ("perturb", "task_kind"))
"""Recipe keys that hold a SQL expression the build splices into its queries."""


def _leaves(node, path: tuple = ()):
    """``(key path, value)`` of every scalar in a parsed recipe."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, path + (index,))
    else:
        yield path, node


def _get(data: dict, path: tuple):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data
