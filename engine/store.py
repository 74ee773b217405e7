"""The store: a folder of LanceDB tables, one per kind of fact, all keyed by ``sample_id``.

Table schemas and column meanings live once, in ``schemas/store.yaml``; this module turns them into
Arrow schemas, appends through Lance commits (a killed stage leaves the last committed version intact),
and exposes the tables to DuckDB, including the joined ``facts`` view recipes filter on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")  # lance logs a WARN on every table creation otherwise

import duckdb  # noqa: E402
import lancedb  # noqa: E402
import pyarrow as pa  # noqa: E402

from engine.paths import SCHEMAS_DIR, load_yaml  # noqa: E402
from engine.sql import sql_literal  # noqa: E402

DEFAULT_STORE = "data/store"

_PRIMITIVES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


def parse_type(text: str) -> pa.DataType:
    """Parse a type string of ``schemas/store.yaml`` (``list<struct<user: string>>``) into Arrow."""
    tokens = re.findall(r"[A-Za-z0-9_]+|[<>,:]", text)
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"type {text!r} ends early")
        token = tokens[pos]
        if expected is not None and token != expected:
            raise ValueError(f"type {text!r}: expected {expected!r}, found {token!r}")
        pos += 1
        return token

    def parse() -> pa.DataType:
        name = take()
        if name == "list":
            take("<")
            inner = parse()
            take(">")
            return pa.list_(inner)
        if name == "struct":
            take("<")
            fields = []
            while True:
                field_name = take()
                take(":")
                fields.append(pa.field(field_name, parse()))
                if take() == ">":
                    return pa.struct(fields)
        if name not in _PRIMITIVES:
            raise ValueError(f"type {text!r}: unknown type {name!r}")
        return _PRIMITIVES[name]

    result = parse()
    if pos != len(tokens):
        raise ValueError(f"type {text!r}: trailing {tokens[pos:]}")
    return result


@dataclass(frozen=True)
class TableSpec:
    """One table of the store as declared in ``schemas/store.yaml``."""

    name: str
    doc: str
    schema: pa.Schema
    docs: dict[str, str]
    join: str | None
    run_as: str | None = None  # a joined table's run_id, shown in ``facts`` under this name

    @property
    def fact_columns(self) -> list[str]:
        """Columns a joined table contributes to the ``facts`` view (all but its keys)."""
        return [n for n in self.schema.names if n not in ("sample_id", "run_id")]


@cache
def table_specs() -> dict[str, TableSpec]:
    """All tables of the store, parsed once from ``schemas/store.yaml``."""
    raw = load_yaml(SCHEMAS_DIR / "store.yaml")
    specs = {}
    for name, body in raw["tables"].items():
        fields = [pa.field(c["name"], parse_type(c["type"])) for c in body["columns"]]
        specs[name] = TableSpec(
            name=name,
            doc=body["doc"],
            schema=pa.schema(fields),
            docs={c["name"]: c["doc"] for c in body["columns"]},
            join=body.get("join"),
            run_as=body.get("run_as"),
        )
    seen: dict[str, str] = {c: "samples" for c in specs["samples"].schema.names}
    for spec in specs.values():
        if spec.join:
            for column in spec.fact_columns + ([spec.run_as] if spec.run_as else []):
                if column in seen:
                    raise ValueError(f"schemas/store.yaml: column {column!r} of {spec.name} clashes with {seen[column]}")
                seen[column] = spec.name
    return specs


def new_run_id(stage: str) -> str:
    """A run id that sorts by start time: ``{stage}-{UTC time}-{4 hex}``."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{stage}-{now:%Y%m%dT%H%M%S%f}-{secrets.token_hex(2)}"


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's output, for the ``runs`` table and manifests."""
    versions = {}
    for name in ("engine", "duckdb", "pyarrow", "lancedb", "pylance", "polars", "datasets", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def conform(spec: TableSpec, data: pa.Table | pa.RecordBatch | list[dict]) -> pa.Table:
    """Cast rows to a table's declared schema; missing columns become NULL, unknown ones are an error."""
    if isinstance(data, list):
        data = pa.Table.from_pylist(data)
    elif isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    unknown = set(data.column_names) - set(spec.schema.names)
    if unknown:
        raise ValueError(f"table {spec.name}: unknown columns {sorted(unknown)}")
    columns = [
        data.column(f.name).cast(f.type) if f.name in data.column_names else pa.nulls(len(data), f.type)
        for f in spec.schema
    ]
    return pa.Table.from_arrays(columns, schema=spec.schema)


class Store:
    """A folder of LanceDB tables described by ``schemas/store.yaml``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("ENGINE_STORE") or DEFAULT_STORE)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(str(self.root))

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- tables --------------------------------------------------------------------------------------
    def spec(self, name: str) -> TableSpec:
        try:
            return table_specs()[name]
        except KeyError:
            raise KeyError(f"the store has no table {name!r}; known tables: {sorted(table_specs())}") from None

    def has(self, name: str) -> bool:
        return (self.root / f"{name}.lance").exists()

    def table(self, name: str):
        """The LanceDB table, or ``None`` when no stage has written it yet."""
        self.spec(name)
        return self.db.open_table(name) if self.has(name) else None

    def append(self, name: str, data: pa.Table | pa.RecordBatch | list[dict]) -> int:
        """Append rows as one Lance commit (all or nothing); returns the table's new version."""
        spec = self.spec(name)
        rows = conform(spec, data)
        table = self.table(name)
        if table is None:
            table = self.db.create_table(name, rows, schema=spec.schema)
        elif len(rows):
            missing = [f for f in spec.schema if f.name not in table.schema.names]
            if missing:  # a column schemas/store.yaml gained after the table was written: NULL for old rows
                table.add_columns(missing)
            table.add(rows)
        return table.version

    def dataset(self, name: str, version: int | None = None):
        """The Lance dataset behind a table, at ``version`` (default: the current one)."""
        import lance

        if not self.has(name):
            raise KeyError(f"the store {self.root} has no table {name!r} yet")
        return lance.dataset(str(self.root / f"{name}.lance"), version=version)

    def positioned(self, con: duckdb.DuckDBPyConnection, version: int | None = None):
        """Register ``sample_positions(sample_id, pos)``: each sample's row position in ``samples`` at a
        version, so later reads can fetch heavy columns (images) batch by batch with ``Dataset.take``.
        Returns the dataset at that version."""
        import numpy as np

        dataset = self.dataset("samples", version)
        ids = dataset.to_table(columns=["sample_id"], scan_in_order=True)
        con.register("sample_positions", ids.append_column("pos", pa.array(np.arange(len(ids), dtype=np.int64))))
        return dataset

    def compact(self, name: str) -> None:
        """Merge the small fragments many batch commits leave behind (a new version, same rows)."""
        table = self.table(name)
        if table is not None and len(table.to_lance().get_fragments()) > 1:
            table.to_lance().optimize.compact_files()

    def versions(self) -> dict[str, int]:
        """Current version of every table that exists."""
        return {name: self.db.open_table(name).version for name in table_specs() if self.has(name)}

    def arrow(self, name: str, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Read a table (or an empty one with its schema) as Arrow."""
        table = self.table(name)
        if table is None:
            schema = self.spec(name).schema
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return table.to_lance().to_table(columns=columns, filter=filter)

    def ids(self, name: str, filter: str | None = None) -> set[str]:
        """The sample ids already present in a table (optionally under a Lance SQL filter)."""
        return set(self.arrow(name, ["sample_id"], filter).column("sample_id").to_pylist())

    # -- runs ----------------------------------------------------------------------------------------
    def record_run(self, run_id: str, stage: str, config: dict, started: dt.datetime, rows: int) -> None:
        """Append the bookkeeping row of a finished run."""
        self.append(
            "runs",
            [
                {
                    "run_id": run_id,
                    "stage": stage,
                    "config": json.dumps(config, sort_keys=True, default=str),
                    "versions": json.dumps(package_versions(), sort_keys=True),
                    "started": started,
                    "finished": dt.datetime.now(dt.timezone.utc),
                    "rows": rows,
                }
            ],
        )

    # -- SQL -----------------------------------------------------------------------------------------
    def connect(self, pins: dict[str, dict] | None = None) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
        """A DuckDB connection with every table as a view of the same name, plus the view ``facts``.

        Each table is read at the version current now, so a query sees one consistent store.

        Parameters
        ----------
        pins
            ``{table: {column: value}}`` choosing which rows of a joined fact table count (e.g. the run
            or model); without a pin, each sample's row from the newest run is used.

        Returns
        -------
        The connection and the table versions it reads.
        """
        con = duckdb.connect()
        versions = {}
        for name, spec in table_specs().items():
            if self.has(name):
                dataset = self.dataset(name)
                versions[name] = dataset.version
                if set(spec.schema.names) <= set(dataset.schema.names):
                    con.register(name, dataset)
                else:  # written before schemas/store.yaml gained a column: read it as NULL
                    con.register(f"_stored_{name}", dataset)
                    con.register(f"_declared_{name}", spec.schema.empty_table())
                    con.execute(f"create view {name} as select * from _stored_{name} union all by name "
                                f"select * from _declared_{name}")
            else:
                con.register(name, spec.schema.empty_table())
        con.execute(facts_view_sql(pins or {}))
        return con, versions


def facts_view_sql(pins: dict[str, dict]) -> str:
    """SQL creating ``facts``: samples left-joined with one row per sample of each ``join: latest`` table."""
    specs = table_specs()
    unknown = set(pins) - {n for n, s in specs.items() if s.join}
    if unknown:
        raise KeyError(f"facts: cannot pin {sorted(unknown)}; joinable tables: {[n for n, s in specs.items() if s.join]}")
    selects = ["samples.*"]
    joins = []
    for name, spec in specs.items():
        if not spec.join:
            continue
        pin = pins.get(name) or {}
        for column in pin:
            if column not in spec.schema.names:
                raise KeyError(f"facts.{name}: no column {column!r} in {name}; columns: {spec.schema.names}")
        where = " and ".join(f"{c} = {sql_literal(v)}" for c, v in pin.items()) or "true"
        columns = ", ".join(spec.fact_columns + ([f"run_id as {spec.run_as}"] if spec.run_as else []))
        joins.append(
            f"left join (select sample_id, {columns} from {name} where {where} "
            f"qualify row_number() over (partition by sample_id order by run_id desc) = 1) as _{name} using (sample_id)"
        )
        selects.extend(f"_{name}.{c}" for c in spec.fact_columns + ([spec.run_as] if spec.run_as else []))
    return f"create or replace view facts as select {', '.join(selects)} from samples " + " ".join(joins)
