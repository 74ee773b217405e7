"""``engine query``: read-only SQL over the store's tables."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from engine.store import Store

READ_ONLY = {"SELECT", "EXPLAIN"}


class QueryError(ValueError):
    pass


def run_query(store: Store, sql: str) -> pa.Table:
    """Run one SELECT (or EXPLAIN) statement; anything that could write is refused before it runs."""
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
    """Print or save a result as a table, CSV, JSON lines or Parquet."""
    import polars as pl

    if output:
        _make_parent(output)
    if fmt == "parquet":
        if not output:
            raise QueryError("--format parquet needs --output FILE")
        pq.write_table(table, output)
    elif fmt == "json":  # one object per line; bytes (images) as base64
        lines = (json.dumps(row, default=_json_default, ensure_ascii=False) for row in table.to_pylist())
        _emit("".join(line + "\n" for line in lines), output)
    elif fmt == "csv":  # nested and binary columns as their Python text
        flat = [
            pa.array([str(v) for v in column.to_pylist()]) if _is_complex(column.type) else column
            for column in table.columns
        ]
        _emit(pl.from_arrow(pa.table(flat, names=table.column_names)).write_csv(), output)
    else:
        frame = pl.from_arrow(table)
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            _emit(str(frame) + "\n", output)


def _is_complex(arrow_type: pa.DataType) -> bool:
    return pa.types.is_nested(arrow_type) or pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _json_default(value):
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


def _emit(text: str, output: str | None) -> None:
    if output:
        with open(output, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
