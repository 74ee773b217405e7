"""``engine query``: read-only SQL over the store's tables."""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a query imports only what it runs: DuckDB, lance, pyarrow (see ``defer_pandas``)
    import pyarrow as pa

    from engine.store import Store

READ_ONLY = {"SELECT", "EXPLAIN"}


class QueryError(ValueError):
    pass


class _NoPandas:
    """An import finder that makes ``import pandas`` fail (see ``defer_pandas``)."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is deferred while pyarrow.dataset loads")
        return None


def defer_pandas() -> None:
    """Load ``pyarrow.dataset`` (which ``lance`` needs) without importing pandas, for a short-lived
    process that never builds a DataFrame (``engine query``, ``engine runs``).

    ``pyarrow.dataset`` probes for pandas while it loads, and importing pandas costs about 0.2-0.3 s, a
    third of a small query. With the probe answered "absent", pyarrow leaves its pandas integration
    off until something asks for it: ``Table.to_pandas`` still imports pandas and works, only
    ``pa.array`` no longer recognises a pandas Series as array-like in that process. Nothing happens
    when pandas or ``pyarrow.dataset`` is already loaded.
    """
    if "pandas" in sys.modules or "pyarrow.dataset" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        import pyarrow.dataset  # noqa: F401
    finally:
        sys.meta_path.remove(blocker)


def run_query(store: Store, sql: str) -> pa.Table:
    """Run one SELECT (or EXPLAIN) statement; anything that could write is refused before it runs."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise QueryError(f"invalid SQL: {str(error).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in READ_ONLY:
        raise QueryError(f"refused: {kind} statements are not allowed; `engine query` is read-only (SELECT/EXPLAIN)")
    con, _ = store.connect()
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as error:
        raise QueryError(str(error).splitlines()[0]) from None
    finally:
        con.close()


def write_result(table: pa.Table, fmt: str, output: str | None, max_rows: int = 50) -> None:
    """Print or save a result as a table (drawn by DuckDB), CSV, JSON lines or Parquet."""
    if output:
        _make_parent(output)
    if fmt == "parquet":
        if not output:
            raise QueryError("--format parquet needs --output FILE")
        import pyarrow.parquet as pq

        pq.write_table(table, output)
    elif fmt == "json":  # one object per line; bytes (images) as base64
        import json

        lines = (json.dumps(row, default=_json_default, ensure_ascii=False) for row in table.to_pylist())
        with _sink(output) as handle:
            handle.writelines(line + "\n" for line in lines)
    elif fmt == "csv":  # nested and binary columns as their Python text, NULL as an empty field
        import csv

        columns = [[_csv_value(v, _is_complex(c.type)) for v in c.to_pylist()] for c in table.columns]
        with _sink(output, newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(table.column_names)
            writer.writerows(zip(*columns))
    else:
        import duckdb

        with duckdb.connect() as con, _sink(output) as handle, redirect_stdout(handle):
            con.from_arrow(table).show(max_rows=max_rows, max_width=200, max_col_width=60)


def _csv_value(value, complex_type: bool):
    if value is None:
        return ""
    if complex_type:
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _is_complex(arrow_type: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_nested(arrow_type) or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _json_default(value):
    import base64
    import datetime as dt

    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def make_parent(path: str | Path) -> None:
    """Create the folder that ``path`` goes into, as people expect of ``-o new/folder/result.csv``; raises
    ``OSError`` with a message for a person when a file stands where a folder should be."""
    parent = Path(path).parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(f"{ancestor} is a file, not a folder")
            break
    parent.mkdir(parents=True, exist_ok=True)


def _make_parent(output: str) -> None:
    try:
        make_parent(output)
    except OSError as error:
        raise QueryError(f"cannot write {output}: {error}") from None
    if Path(output).is_dir():
        raise QueryError(f"cannot write {output}: it is a folder")


@contextmanager
def _sink(output: str | None, newline: str | None = None):
    """Where a result goes: the file ``output``, or stdout."""
    if output:
        with open(output, "w", newline=newline, encoding="utf-8") as handle:
            yield handle
    else:
        yield sys.stdout
