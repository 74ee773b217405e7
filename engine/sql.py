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


class WhereError(ValueError):
    """A filter that is not exactly one SQL expression; the message says why, in one line."""


_TEMPLATE = "select 1 where ({})"


def _parse_tree(sql: str) -> dict:
    """DuckDB's parse tree of one SELECT (``json_serialize_sql``), without source positions."""
    import json

    import duckdb

    with duckdb.connect() as con:
        tree = json.loads(con.execute("select json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        message = tree.get("error_message", "cannot be parsed")
        if "Only SELECT" in message:  # the text closed the expression and began another statement
            message = "more than one statement"
        elif tree.get("error_type") == "parser":
            message = f"Parser Error: {message}"
        raise WhereError(message.splitlines()[0])

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("query_location")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(tree)


def check_expression(expression: str) -> str:
    """Check that ``expression`` is exactly one SQL expression, so it can be pasted into a WHERE clause.

    A filter comes from a recipe or a ``--where`` flag and is spliced into the engine's own SQL. Text
    such as ``true) limit 0; copy ... to 'x.csv'; select 1 where (true`` would otherwise run statements
    of its own, and ``a) or (b`` would escape the parentheses it is put in. DuckDB's tokenizer and parser
    decide, not a pattern: no comments (``--`` could hide the rest of a query), parentheses balanced
    within the text itself, and ``select 1 where (<expression>)`` must parse to exactly that shape, one
    SELECT with nothing but the filter added (no second statement, UNION, LIMIT, GROUP BY, ...).
    Whether the expression names real columns and is boolean is checked when it is bound to a table.

    Returns
    -------
    The expression, unchanged.

    Raises
    ------
    WhereError
        Saying what is wrong, in one line (the caller adds which key or flag).
    """
    import duckdb

    if not isinstance(expression, str) or not expression.strip():
        raise WhereError(f"expected a SQL expression, got {expression!r}")
    try:
        tokens = duckdb.tokenize(expression)
    except duckdb.Error as error:
        raise WhereError(f"invalid SQL: {str(error).splitlines()[0]}") from None
    depth = 0
    for index, (start, kind) in enumerate(tokens):
        end = tokens[index + 1][0] if index + 1 < len(tokens) else len(expression)
        text = expression[start:end]
        if kind == duckdb.token_type.comment:
            raise WhereError("comments are not allowed in a filter")
        if kind != duckdb.token_type.operator:
            continue
        if ";" in text:
            raise WhereError("give one expression, not statements separated by ';'")
        for char in text:
            depth += (char == "(") - (char == ")")
            if depth < 0:
                raise WhereError(f"unbalanced ')' at character {start + text.index(')') + 1}")
    if depth:
        raise WhereError("unbalanced '(': a parenthesis is not closed")
    try:
        tree = _parse_tree(_TEMPLATE.format(expression))
    except WhereError as error:
        raise WhereError(f"invalid SQL: {error}") from None
    template = _parse_tree(_TEMPLATE.format("true"))
    statements = tree["statements"]
    if len(statements) != 1:
        raise WhereError("give one expression, not several statements")
    node, expected = statements[0]["node"], template["statements"][0]["node"]
    if node.get("where_clause") is None or {**node, "where_clause": None} != {**expected, "where_clause": None}:
        raise WhereError("give one expression; the text adds clauses of its own to the query it goes into")
    return expression


def check_filter(con, expression: str, relation: str = "facts") -> None:
    """Check a filter completely: one expression (``check_expression``) that binds against ``relation``
    on ``con`` and is boolean. Nothing is executed (DuckDB only plans the query).

    Raises
    ------
    WhereError
        Saying what is wrong, in one line.
    """
    import duckdb

    check_expression(expression)
    try:
        kind = con.execute(f"describe select ({expression}) as keep from {relation}").fetchall()[0][1]
    except duckdb.Error as error:
        raise WhereError(f"invalid SQL: {str(error).splitlines()[0]}") from None
    if kind not in ("BOOLEAN", '"NULL"', "NULL"):
        raise WhereError(f"expected a boolean expression, got a value of type {kind}")
