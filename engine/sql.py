"""SQL text built from Python values: the one place that quotes a literal."""

from __future__ import annotations


def sql_literal(value) -> str:
    """A SQL literal: booleans and numbers as they are, anything else as a single-quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values) -> str:
    """``(v1, v2, ...)`` for ``IN`` and DuckDB list literals' contents."""
    return "(" + ", ".join(sql_literal(v) for v in values) + ")"
