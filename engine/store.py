"""The store: a folder of LanceDB tables, one per kind of fact, all keyed by ``sample_id``.

Table schemas and column meanings live once, in ``schemas/store.yaml``; this module turns them into
Arrow schemas, appends through Lance commits (a killed stage leaves the last committed version intact),
and exposes the tables to DuckDB, including the joined ``facts`` view recipes filter on.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")  # lance logs a WARN on every table creation otherwise

import duckdb  # noqa: E402
import pyarrow as pa  # noqa: E402

from engine.paths import DEFAULT_STORE, SCHEMAS_DIR, load_yaml  # noqa: E402,F401
from engine.sql import sql_literal  # noqa: E402

KEEP_VERSIONS = dt.timedelta(hours=1)
"""How long an old table version is kept after a newer one exists (see ``Store.compact``)."""

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
        if name in ("list", "vector"):  # a vector is a list whose width each partition fixes (TableSpec.vectors)
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
    unique: tuple[str, ...] = ()
    partition: tuple[str, ...] = ()
    vectors: tuple[str, ...] = ()
    run_as: str | None = None  # a joined table's run_id, shown in ``facts`` under this name

    def physical_schema(self, widths: dict[str, int]) -> pa.Schema:
        """The schema of one partition: each vector column a fixed-size list of its width."""
        return pa.schema([pa.field(f.name, pa.list_(f.type.value_type, widths[f.name])) if f.name in self.vectors else f
                          for f in self.schema])

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
            unique=tuple(body.get("unique", ())),
            partition=tuple(body.get("partition", ())),
            vectors=tuple(c["name"] for c in body["columns"] if c["type"].startswith("vector<")),
            run_as=body.get("run_as"),
        )
        if specs[name].join not in (None, "run", "latest"):
            raise ValueError(f"schemas/store.yaml: {name}.join must be run or latest, got {specs[name].join!r}")
    seen: dict[str, str] = {c: "samples" for c in specs["samples"].schema.names}
    for spec in specs.values():
        if spec.join:
            for column in spec.fact_columns + ([spec.run_as] if spec.run_as else []):
                if column in seen:
                    raise ValueError(f"schemas/store.yaml: column {column!r} of {spec.name} clashes with {seen[column]}")
                seen[column] = spec.name
    return specs


_DUCKDB_LISTS = {pa.float32(): "float[]", pa.float64(): "double[]"}


def partition_table_name(spec: TableSpec, key: dict) -> str:
    """The Lance table holding one partition of ``spec`` (e.g. one model's text embeddings):
    ``{values}-{8 hex of their SHA-256}``, the values made safe for a table name and the hash keeping two
    values that read alike (``a/b``, ``a_b``) apart."""
    missing = [c for c in spec.partition if key.get(c) is None]
    if missing:
        raise KeyError(f"table {spec.name} is stored per {', '.join(spec.partition)}: name {', '.join(missing)}")
    values = [str(key[c]) for c in spec.partition]
    slug = "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", v) for v in values)
    return f"{slug}-{hashlib.sha256(chr(0).join(values).encode()).hexdigest()[:8]}"


def new_run_id(stage: str, tail: str | None = None) -> str:
    """A run id that sorts by start time: ``{stage}-{UTC time}-{tail}``; the tail is 4 random hex digits
    unless given (a resumable stage gives its configuration's digest, see ``engine.stages.base``)."""
    now = dt.datetime.now(dt.timezone.utc)
    return f"{stage}-{now:%Y%m%dT%H%M%S%f}-{tail or secrets.token_hex(2)}"


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


class StoreNotFound(LookupError):
    """A read found no store at the given folder."""


def committed(path: Path) -> bool:
    """Whether a Lance table folder holds at least one committed version (a manifest)."""
    versions = path / "_versions"
    return versions.is_dir() and any(versions.glob("*.manifest"))


class Store:
    """A folder of LanceDB tables described by ``schemas/store.yaml``."""

    def __init__(self, root: str | os.PathLike | None = None, create: bool = True):
        """Open the store at ``root``; ``create=False`` (read commands) refuses a folder that is not a
        store instead of creating an empty one, so a mistyped ``--store`` is not answered with nothing."""
        self.root = Path(root or os.environ.get("ENGINE_STORE") or DEFAULT_STORE)
        if not create:
            if not self.root.is_dir():
                raise StoreNotFound(f"no store at {self.root} (check --store / ENGINE_STORE); run `engine ingest` first to create one")
            if not any(self.root.glob("*.lance")):
                raise StoreNotFound(f"{self.root} holds no store tables (check --store / ENGINE_STORE); run `engine ingest` first")
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = None
        self._lock_depth, self._lock_file, self._thread_lock = 0, None, threading.RLock()
        self._present: dict[Path, tuple[dict[int, str], set]] = {}  # see _drop_present
        if (self.root / "embeddings.lance").is_dir():  # a store from before fixed-size vectors
            self.migrate_embeddings()

    @property
    def db(self):
        """The LanceDB connection, opened on first use: importing lancedb costs over a second, and reads
        (``connect``, ``dataset``, ``arrow``) go through ``lance`` directly."""
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(str(self.root))
        return self._db

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- tables --------------------------------------------------------------------------------------
    def spec(self, name: str) -> TableSpec:
        try:
            return table_specs()[name]
        except KeyError:
            raise KeyError(f"the store has no table {name!r}; known tables: {sorted(table_specs())}") from None

    def _path(self, name: str, key: dict) -> Path:
        """The Lance folder of a table, or of one partition of a partitioned table."""
        spec = self.spec(name)
        if spec.partition:
            return self.root / name / f"{partition_table_name(spec, key)}.lance"
        if key:
            raise KeyError(f"table {name} is not partitioned; it takes no {sorted(key)}")
        return self.root / f"{name}.lance"

    def partitions(self, name: str) -> list[Path]:
        """The Lance folders of a partitioned table's partitions, in name order."""
        self.spec(name)
        return sorted(p for p in (self.root / name).glob("*.lance") if committed(p))

    def has(self, name: str, **key) -> bool:
        """Whether a table (or, given its partition ``key``, that partition) has at least one committed
        version; a partitioned table without a key: whether any partition has. A folder a kill left during
        the table's creation, with data files but no version, does not count: the next write recreates it."""
        if self.spec(name).partition and not key:
            return bool(self.partitions(name))
        return committed(self._path(name, key))

    def _db_for(self, name: str):
        """The LanceDB connection holding a table: the store's, or the folder of a partitioned table's."""
        if not self.spec(name).partition:
            return self.db
        import lancedb

        return lancedb.connect(str(self.root / name))

    def table(self, name: str, **key):
        """The LanceDB table (for a partitioned table: the partition ``key`` names, e.g.
        ``table("embeddings", modality="text", model=M)``), or ``None`` when no stage has written it yet."""
        path = self._path(name, key)
        return self._db_for(name).open_table(path.name[: -len(".lance")]) if committed(path) else None

    def append(self, name: str, data: pa.Table | pa.RecordBatch | list[dict]) -> int:
        """Append rows as one Lance commit (all or nothing); returns the table's new version. Rows of a
        partitioned table must all belong to one partition."""
        spec = self.spec(name)
        rows = conform(spec, data)
        with self.writing():
            if spec.partition:
                return self._write_partition(spec, rows, overwrite=False)
            path = self._path(name, {})
            table = self.table(name)
            if table is None:
                if path.exists():  # created by a run killed before its first commit: nothing in it was committed
                    shutil.rmtree(path)
                table = self.db.create_table(name, rows, schema=spec.schema)
            else:
                rows = self._drop_present(spec, path, rows)
                if len(rows):
                    missing = [f for f in spec.schema if f.name not in table.schema.names]
                    if missing:  # a column schemas/store.yaml gained after the table was written: NULL for old rows
                        table.add_columns(missing)
                    table.add(rows)
            if spec.unique:  # note our own fragment now, while no one else can commit
                self._drop_present(spec, path, rows.slice(0, 0))
            return table.version

    @contextmanager
    def writing(self):
        """Hold the store's write lock (``flock`` on ``.write-lock`` in the store folder): every append
        and compaction of every process runs inside it, so two writers never race on a commit or on the
        check of which rows are already present. Re-entrant within one ``Store``."""
        with self._thread_lock:  # threads of one process (a stage's commit thread) take turns first
            if self._lock_depth == 0:
                self._lock_file = open(self.root / ".write-lock", "a+")
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None

    def _drop_present(self, spec: TableSpec, path: Path, rows: pa.Table) -> pa.Table:
        """``rows`` without those whose ``unique`` columns are already in the table (call under the lock).

        A stage picks its work from the ids present when it starts; another process may have written
        some of them since. The values already present are cached per fragment and only fragments this
        ``Store`` has not seen are read, so a commit costs a read of what others wrote since the last
        one. A fragment that disappears or gains deletions (compaction, a delete) resets the cache.
        """
        if not spec.unique:
            return rows
        import lance

        dataset = lance.dataset(str(path))
        fragments = {f.fragment_id: repr(f.metadata.deletion_file) for f in dataset.get_fragments()}
        seen, present = self._present.get(path, ({}, set()))
        if any(fragments.get(fid) != sig for fid, sig in seen.items()):
            seen, present = {}, set()
        new = [fid for fid in fragments if fid not in seen]
        if new:
            # a unique column the table gained after it was written reads as NULL in the older rows
            stored = [c for c in spec.unique if c in dataset.schema.names]
            read = dataset.scanner(columns=stored, fragments=[dataset.get_fragment(f) for f in new]).to_table()
            nulls = [None] * len(read)
            present |= set(zip(*(read.column(c).to_pylist() if c in stored else nulls for c in spec.unique)))
        self._present[path] = (fragments, present)
        if not len(rows) or not present:
            return rows
        keys = zip(*(rows.column(c).to_pylist() for c in spec.unique))
        keep = [key not in present for key in keys]
        return rows if all(keep) else rows.filter(pa.array(keep))

    def migrate_embeddings(self) -> dict[str, int]:
        """Move a store written before fixed-size vectors onto the current layout.

        Such a store holds every embedding in one table, ``embeddings.lance``, whose ``vector`` is a
        variable-length list, so LanceDB's search and ANN indexes refuse it. Its rows are copied, one
        (modality, model) at a time, into that partition's table of fixed-size vectors (``append`` drops
        rows already copied, so a killed migration resumes), a transformed model's saved transform is
        copied to where ``engine.stages.embed`` looks for it when one fit made all its vectors, and the old
        table is then renamed ``embeddings.lance.before-fixed-size`` (kept, never deleted). A model
        whose vectors have more than one width cannot be stored fixed-size: its rows stay in the old
        table only, and a warning names it.

        Returns
        -------
        ``{"modality/model": rows copied}``.
        """
        import sys

        import lance
        import pyarrow.compute as pc

        old = self.root / "embeddings.lance"
        copied: dict[str, int] = {}
        with self.writing():
            if not old.is_dir():  # another process migrated it meanwhile
                return copied
            spec = self.spec("embeddings")
            if committed(old):
                dataset = lance.dataset(str(old))
                keys = dataset.to_table(columns=["modality", "model"])
                groups = keys.group_by(["modality", "model"]).aggregate([]).sort_by([("modality", "ascending"), ("model", "ascending")])
                for modality, model in zip(groups.column("modality").to_pylist(), groups.column("model").to_pylist()):
                    rows = conform(spec, dataset.to_table(
                        filter=f"modality = {sql_literal(modality)} and model = {sql_literal(model)}"))
                    widths = pc.unique(pc.list_value_length(rows.column("vector"))).to_pylist()
                    if len(widths) != 1 or widths[0] is None:
                        print(f"warning: {modality} embeddings of {model!r} have widths {sorted(w for w in widths if w is not None)}: "
                              f"not migrated, left in {old.name}.before-fixed-size (embed the model again)", file=sys.stderr)
                        continue
                    self._write_partition(spec, rows, overwrite=False)
                    copied[f"{modality}/{model}"] = len(rows)
                    self._migrate_transform(spec, modality, model, pc.unique(rows.column("run_id")).to_pylist())
            aside = old.with_name(old.name + ".before-fixed-size")
            while aside.exists():
                aside = aside.with_name(aside.name + "-again")
            old.rename(aside)
        return copied

    def _migrate_transform(self, spec: TableSpec, modality: str, model: str, runs: list) -> None:
        """Copy a transformed model's transform from the old place (``transforms/{model, made safe}.npz``)
        to ``transforms/{partition table}/{run_id}.npz`` when one fit run made all its vectors."""
        old = self.root / "transforms" / (model.replace("/", "__").replace("|", "--") + ".npz")
        if len(runs) != 1 or runs[0] is None or not old.is_file():
            return
        folder = self.root / "transforms" / partition_table_name(spec, {"modality": modality, "model": model})
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{runs[0]}.npz").exists():
            shutil.copyfile(old, folder / f"{runs[0]}.npz")

    def overwrite(self, name: str, data: pa.Table | pa.RecordBatch | list[dict]) -> int:
        """Replace one partition of a partitioned table with ``data`` in one Lance commit (readers see
        the old rows or the new ones, never a mix); returns the partition's new version."""
        spec = self.spec(name)
        if not spec.partition:
            raise ValueError(f"table {name} is append-only; only a partitioned table's partition can be replaced")
        with self.writing():
            return self._write_partition(spec, conform(spec, data), overwrite=True)

    def _write_partition(self, spec: TableSpec, rows: pa.Table, overwrite: bool) -> int:
        import pyarrow.compute as pc

        key = {}
        for column in spec.partition:
            values = pc.unique(rows.column(column)).to_pylist()
            if len(values) != 1:
                raise ValueError(f"table {spec.name}: one write holds one {column}, got {values[:5]}")
            key[column] = values[0]
        widths = {}
        for column in spec.vectors:
            lengths = pc.unique(pc.list_value_length(rows.column(column))).to_pylist()
            if len(lengths) != 1 or lengths[0] is None:
                raise ValueError(f"table {spec.name} {key}: every {column} must have one width, got {lengths[:5]}")
            widths[column] = lengths[0]
        schema = spec.physical_schema(widths)
        rows = rows.cast(schema)
        table = self.table(spec.name, **key)
        path = self._path(spec.name, key)
        if table is None and path.exists():  # created by a run killed before its first commit
            shutil.rmtree(path)
        if table is not None and not overwrite:
            rows = self._drop_present(spec, path, rows)
            if table.schema != schema:
                raise ValueError(f"table {spec.name} {key} holds {table.schema.field(spec.vectors[0]).type}, "
                                 f"not {schema.field(spec.vectors[0]).type}")
            if len(rows):
                table.add(rows)
            return table.version
        (self.root / spec.name).mkdir(exist_ok=True)
        name = self._path(spec.name, key).name[: -len(".lance")]
        table = self._db_for(spec.name).create_table(name, rows, schema=schema, mode="overwrite" if table is not None else "create")
        return table.version

    def dataset(self, name: str, version: int | None = None, **key):
        """The Lance dataset behind a table (or one partition), at ``version`` (default: the current one)."""
        import lance

        path = self._path(name, key)
        if not committed(path):
            raise KeyError(f"the store {self.root} has no table {name!r}{f' {key}' if key else ''} yet")
        return lance.dataset(str(path), version=version)

    def positioned(self, con: duckdb.DuckDBPyConnection, version: int | None = None):
        """Register ``sample_positions(sample_id, pos)``: each sample's row position in ``samples`` at a
        version, so later reads can fetch heavy columns (images) batch by batch with ``Dataset.take``.
        Returns the dataset at that version."""
        import numpy as np

        dataset = self.dataset("samples", version)
        ids = dataset.to_table(columns=["sample_id"], scan_in_order=True)
        con.register("sample_positions", ids.append_column("pos", pa.array(np.arange(len(ids), dtype=np.int64))))
        return dataset

    def compact(self, name: str, keep: dt.timedelta | None = None, **key) -> dict:
        """Merge the small fragments many batch commits leave behind (a new version, same rows), then
        delete the files only versions older than ``keep`` need.

        Every commit is a version, and a version keeps its files until it is cleaned up: a stage that
        commits a thousand times leaves a thousand versions and, after compaction, every row twice on
        disk. Versions still kept: the newest, any younger than ``keep`` (default ``KEEP_VERSIONS``:
        a reader that opened one a moment ago can finish), and every tagged one (``engine build`` tags
        the versions a published manifest names, so the mixture stays reproducible). A recipe's
        ``facts:`` pins name rows (a run, a model), not versions: tables are append-only, so the newest
        version still holds them.

        Returns
        -------
        ``{"fragments": before -> after, "versions_removed": n, "bytes_removed": n}``.
        """
        return self._compact_path(self._path(name, key), keep) if self.has(name, **key) else {}

    def _compact_path(self, path: Path, keep: dt.timedelta | None) -> dict:
        import lance

        with self.writing():
            dataset = lance.dataset(str(path))
            before = len(dataset.get_fragments())
            if before > 1:
                dataset.optimize.compact_files()
                dataset = lance.dataset(str(path))
            stats = dataset.cleanup_old_versions(older_than=KEEP_VERSIONS if keep is None else keep,
                                                 error_if_tagged_old_versions=False)
        return {"fragments": f"{before} -> {len(dataset.get_fragments())}",
                "versions_removed": stats.old_versions, "bytes_removed": stats.bytes_removed}

    def compact_all(self, keep: dt.timedelta | None = None) -> dict[str, dict]:
        """``compact`` every table of the store."""
        report = {}
        for name, spec in table_specs().items():
            if spec.partition:
                for path in self.partitions(name):
                    report[f"{name}/{path.name[: -len('.lance')]}"] = self._compact_path(path, keep)
            elif self.has(name):
                report[name] = self.compact(name, keep)
        return report

    def tag_versions(self, tag: str, versions: dict[str, int]) -> None:
        """Tag each table at a version (moving the tag if it exists), so ``compact`` keeps that version."""
        import lance

        with self.writing():
            for name, version in versions.items():
                # a partition is named "table/partition" (as ``register`` reports it)
                path = self.root / f"{name}.lance"
                if committed(path):
                    tags = lance.dataset(str(path)).tags
                    if tag in tags.list():
                        tags.update(tag, version)
                    else:
                        tags.create(tag, version)

    def versions(self) -> dict[str, int]:
        """Current version of every table that exists."""
        return {name: self.dataset(name).version for name, spec in table_specs().items()
                if not spec.partition and self.has(name)}

    def arrow(self, name: str, columns: list[str] | None = None, filter: str | None = None, **key) -> pa.Table:
        """Read a table (or an empty one with its schema) as Arrow. A partitioned table is read whole
        (every partition, vectors as variable-length lists), or one partition when ``key`` names it."""
        spec = self.spec(name)
        empty = spec.schema.empty_table().select(columns) if columns else spec.schema.empty_table()
        if not self.has(name, **key):
            return empty
        if spec.partition and not key:
            import lance

            parts = [lance.dataset(str(p)).to_table(columns=columns, filter=filter) for p in self.partitions(name)]
            return pa.concat_tables([part.cast(empty.schema) for part in parts])
        return self.dataset(name, **key).to_table(columns=columns, filter=filter)

    def ids(self, name: str, filter: str | None = None) -> set[str]:
        """The sample ids already present in a table (optionally under a Lance SQL filter)."""
        return set(self.arrow(name, ["sample_id"], filter).column("sample_id").to_pylist())

    # -- runs ----------------------------------------------------------------------------------------
    def record_run(self, run_id: str, stage: str, config: dict, started: dt.datetime, rows: int) -> None:
        """Append the bookkeeping row of a finished run, then ``compact_all`` (see ``compact``)."""
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
        # a stage's many small commits end here: merge them and drop the versions no one can need
        self.compact_all()

    # -- SQL -----------------------------------------------------------------------------------------
    def connect(self, pins: dict[str, dict] | None = None) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
        """A DuckDB connection with every table as a view of the same name, plus the view ``facts``.

        Each table is read at the version current now, so a query sees one consistent store.

        Parameters
        ----------
        pins
            ``{table: {column: value}}`` choosing which rows of a joined fact table count (e.g. the run
            or model); without a pin, a ``join: run`` table gives its newest finished run
            (``newest_run_sql``) and a ``join: latest`` table each sample's newest row.

        Returns
        -------
        The connection and the table versions it reads.
        """
        con = duckdb.connect()
        return con, self.register(con, pins)

    def register(self, con: duckdb.DuckDBPyConnection, pins: dict[str, dict] | None = None) -> dict[str, int]:
        """Make every table of the store a view of ``con`` and define ``facts`` (see ``connect``; ``attach``
        does this for a connection of the user's own). Returns the versions read."""
        versions = {}
        for name, spec in table_specs().items():
            if spec.partition:  # one view over all partitions, vectors read as lists (their widths differ)
                import lance

                columns = ", ".join(f"{c}::{_DUCKDB_LISTS[spec.schema.field(c).type.value_type]} as {c}" if c in spec.vectors
                                    else c for c in spec.schema.names)
                parts = []
                for i, path in enumerate(self.partitions(name)):
                    dataset = lance.dataset(str(path))
                    con.register(f"_{name}_{i}", dataset)
                    parts.append(f"select {columns} from _{name}_{i}")
                    versions[f"{name}/{path.name[: -len('.lance')]}"] = dataset.version
                if parts:
                    con.execute(f"create or replace temp view {name} as " + " union all ".join(parts))
                else:
                    con.register(name, spec.schema.empty_table())
            elif self.has(name):
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
        check_pins(con, pins or {})
        return versions


def attach(con: duckdb.DuckDBPyConnection, store: str | os.PathLike | Store, pins: dict[str, dict] | None = None) -> dict[str, int]:
    """Make a store readable from your own DuckDB connection: each table becomes a view of the same name
    and ``facts`` joins them as ``engine query`` does.

    Examples
    --------
    >>> con = duckdb.connect()
    >>> attach(con, "data/store")
    >>> con.sql("select category, avg(u_v) from facts group by 1").show()

    Returns
    -------
    The version of each table the views read (they stay at it: attach again to see later commits).
    """
    if not isinstance(store, Store):
        if not (Path(store) / "samples.lance").exists():  # a mistyped path must not answer with empty tables
            raise FileNotFoundError(f"{store} is not a store (no samples table); `engine ingest` writes one")
        store = Store(store)
    return store.register(con, pins)


def newest_run_sql(table: str, finished_only: bool = False) -> str:
    """A SQL scalar expression: the run of ``table`` a reader takes when none is named.

    That is the newest finished run (one with its row in ``runs``: a killed run has none), so a
    partial rescoring or a run still being written is never mixed with a complete one. Unless
    ``finished_only``, a table none of whose runs has a ``runs`` row (rows written by hand or by another
    tool) gives its newest run instead. ``facts`` and the MI gate both choose their run here.
    """
    finished = f"(select max(run_id) from {table} where run_id in (select run_id from runs))"
    return finished if finished_only else f"coalesce({finished}, (select max(run_id) from {table}))"


def facts_view_sql(pins: dict[str, dict]) -> str:
    """SQL creating ``facts``: samples left-joined with each joinable table. A ``join: run`` table gives
    the rows of one run (the pinned ``run_id``, else ``newest_run_sql``); a ``join: latest`` table gives
    each sample's row from its newest run. Other pinned columns filter the rows first."""
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
        conditions = [f"{c} = {sql_literal(v)}" for c, v in pin.items()]
        if spec.join == "run" and "run_id" not in pin:
            conditions.append(f"run_id = {newest_run_sql(name)}")
        where = " and ".join(conditions) or "true"
        columns = ", ".join(spec.fact_columns + ([f"run_id as {spec.run_as}"] if spec.run_as else []))
        joins.append(
            f"left join (select sample_id, {columns} from {name} where {where} "
            f"qualify row_number() over (partition by sample_id order by run_id desc) = 1) as _{name} using (sample_id)"
        )
        selects.extend(f"_{name}.{c}" for c in spec.fact_columns + ([spec.run_as] if spec.run_as else []))
    return f"create or replace temp view facts as select {', '.join(selects)} from samples " + " ".join(joins)


def check_pins(con: duckdb.DuckDBPyConnection, pins: dict[str, dict]) -> None:
    """Refuse a ``facts`` pin that matches no row (a mistyped run id or model), in one line that lists
    what the table holds, instead of joining NULLs.

    Raises
    ------
    KeyError
        ``facts.{table}: no rows with run_id = 'x'; its newest run_id values: [...]``.
    """
    for name, pin in pins.items():
        for column, value in (pin or {}).items():
            if con.execute(f"select count(*) from {name} where {column} = ?", [value]).fetchone()[0]:
                continue
            known = [v for (v,) in con.execute(f"select distinct {column} from {name} where {column} is not null "
                                               f"order by 1 desc limit 5").fetchall()]
            raise KeyError(f"facts.{name}: no rows with {column} = {value!r}; "
                           f"its newest {column} values: {known or 'none, the table is empty'}")
