"""Sources in the Cauldron / FineVision schema: ``images: list[Image]``, ``texts: list[{user, assistant,
source}]`` (an optional ``label`` column is kept). Read from the hub by dataset id and config(s), from a
folder of Parquet files (``{subset}/{split}-*.parquet``, as the hub stores them), or from a
``datasets.save_to_disk`` folder. Everything streams in batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.ingest.source import RawRow, Shard, Source

READ_BATCH = 64
SHARD_ROWS = 16384  # a Parquet file of more rows is split into shards of whole row groups of about this many rows


def _records(batch: pa.RecordBatch | pa.Table) -> list[dict | str]:
    """The rows of an Arrow batch as dicts. A row Python cannot read (a string that is not valid UTF-8)
    comes back as the reason instead, so that one bad row is rejected rather than failing its batch."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    records: list[dict | str] = []
    for index in range(batch.num_rows):  # only for a batch that holds a bad row
        row = batch.slice(index, 1)
        try:
            records.append(row.to_pylist()[0])
        except UnicodeDecodeError:
            bad = []
            for name in row.column_names:
                try:
                    row.column(name).to_pylist()
                except UnicodeDecodeError:
                    bad.append(name)
            records.append(f"text is not valid UTF-8 (column {', '.join(bad)})")
    return records


def _rows_of(batch: pa.RecordBatch | pa.Table, subset: str, split: str, start: int) -> Iterator[RawRow]:
    for offset, row in enumerate(_records(batch)):
        if isinstance(row, str):
            yield RawRow(subset=subset, split=split, row=start + offset, images=[], texts=[], error=row)
            continue
        yield RawRow(
            subset=subset,
            split=split,
            row=start + offset,
            images=row.get("images") or [],
            texts=row.get("texts") or [],
            label=row.get("label"),
        )


class HubUnreachable(ConnectionError):
    """The Hugging Face hub could not be reached; the message says how to ingest a local copy instead."""


def _unreachable(error: BaseException) -> bool:
    """Whether an error, or one it was raised from, means the hub could not be reached (no network,
    offline mode, a refused connection, a time-out) rather than, say, a dataset that does not exist."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)):
            return True
        # huggingface_hub's HTTP client (httpx, or its fork httpx2): a TransportError is a failure to talk
        # to the server at all; matched by name so that neither package has to be imported here
        if any(k.__name__ == "TransportError" and k.__module__.split(".")[0].startswith("httpx") for k in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ParquetFolderSource(Source):
    """A local folder of Parquet files with the Cauldron features.

    The subset of a file is its first folder under ``root`` (``root/ai2d/train-00000.parquet`` is
    ``ai2d``), or ``subset`` for files directly in ``root``; its split is the file name's prefix before
    the first ``-`` when that is a split name, else ``split``.
    """

    def __init__(self, root: str | Path, name: str = "cauldron", subsets: list[str] | None = None, split: str = "train"):
        self.root = Path(root)
        self.name = name
        self.split = split
        files = sorted(self.root.rglob("*.parquet")) if self.root.is_dir() else [self.root]
        self.files = []
        for path in files:
            relative = path.relative_to(self.root) if self.root.is_dir() else Path(path.name)
            subset = relative.parts[0] if len(relative.parts) > 1 else (subsets[0] if subsets else self.root.stem)
            prefix = path.stem.split("-")[0]
            file_split = prefix if prefix in ("train", "validation", "test") else split
            if subsets and subset not in subsets:
                continue
            if file_split != split:
                continue
            self.files.append((path, subset))
        if not self.files:
            raise FileNotFoundError(f"no Parquet files for split {split!r} under {self.root}")

    def total(self) -> int:
        return sum(shard.count for shard in self.shards())

    def config(self) -> dict:
        return {"source": self.name, "root": str(self.root), "split": self.split, "files": [str(p) for p, _ in self.files]}

    def shards(self, shard_rows: int = SHARD_ROWS) -> list[Shard]:
        """A shard per file, or per run of whole row groups of about ``shard_rows`` rows for a larger file
        (so that one large file among small ones does not hold back the shards after it); a subset's rows
        number on across its files, so a shard's first row is the count of the rows before it in its subset
        (from the files' footers, without reading rows)."""
        shards, counters = [], {}
        for path, subset in self.files:
            metadata = pq.ParquetFile(path).metadata
            groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            runs: list[list[int]] = []
            filled = shard_rows  # rows in the last run
            for index, rows in enumerate(groups):
                if filled >= shard_rows:
                    runs.append([])
                    filled = 0
                runs[-1].append(index)
                filled += rows
            whole = len(runs) <= 1
            for run in runs or [[]]:
                start, count = counters.get(subset, 0), sum(groups[i] for i in run)
                reader = ParquetFileSource(path, subset, self.split, self.name, start, None if whole else tuple(run))
                shards.append(Shard(reader, f"{self.name}:{subset}:{self.split}:", start, count))
                counters[subset] = start + count
        return shards

    def rows(self) -> Iterator[RawRow]:
        for shard in self.shards():
            yield from shard.reader.rows()


class ParquetFileSource(Source):
    """One Parquet file of a ``ParquetFolderSource``, or some of its row groups: their rows, numbered from
    ``start`` (a shard)."""

    def __init__(self, path: str | Path, subset: str, split: str, name: str, start: int = 0,
                 row_groups: tuple[int, ...] | None = None):
        self.path, self.subset, self.split, self.name, self.start = Path(path), subset, split, name, start
        self.row_groups = row_groups  # None: the whole file

    def total(self) -> int:
        metadata = pq.ParquetFile(self.path).metadata
        if self.row_groups is None:
            return metadata.num_rows
        return sum(metadata.row_group(i).num_rows for i in self.row_groups)

    def config(self) -> dict:
        return {"source": self.name, "file": str(self.path), "subset": self.subset, "split": self.split, "start": self.start,
                "row_groups": None if self.row_groups is None else list(self.row_groups)}

    def rows(self) -> Iterator[RawRow]:
        handle = pq.ParquetFile(self.path)
        wanted = [c for c in ("images", "texts", "label") if c in handle.schema_arrow.names]
        missing = {"images", "texts"} - set(wanted)
        if missing:
            raise ValueError(f"{self.path}: not in the Cauldron schema, missing column(s) {sorted(missing)}")
        row = self.start
        for batch in handle.iter_batches(batch_size=READ_BATCH, columns=wanted, row_groups=self.row_groups):
            yield from _rows_of(batch, self.subset, self.split, row)
            row += batch.num_rows


class HubSource(Source):
    """A Hugging Face dataset in the Cauldron schema, by hub id (streamed) or ``save_to_disk`` folder."""

    def __init__(self, location: str, name: str = "cauldron", subsets: list[str] | None = None, split: str = "train"):
        import datasets

        self.location = location
        self.name = name
        self.split = split
        self.local = Path(location).is_dir()
        if self.local:
            self.subsets = subsets or [Path(location).name]
        else:
            with self._reaching_the_hub():
                self.subsets = subsets or datasets.get_dataset_config_names(location)

    def config(self) -> dict:
        return {"source": self.name, "location": self.location, "subsets": self.subsets, "split": self.split}

    def shards(self) -> list[Shard]:
        """One shard per subset (its rows number from 0); how many rows a streamed subset has is not known
        before reading it."""
        return [Shard(HubSource(self.location, self.name, [subset], self.split), f"{self.name}:{subset}:{self.split}:")
                for subset in self.subsets]

    def _open(self, subset: str):
        import datasets

        if self.local:
            loaded = datasets.load_from_disk(self.location)
            dataset = loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(self.location, subset, split=self.split, streaming=True)
        if "images" in dataset.features:  # read encoded bytes, decode ourselves (and reject what fails)
            dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
        return dataset.with_format("arrow")  # Arrow batches: a row with bad text is rejected alone

    @contextmanager
    def _reaching_the_hub(self):
        """Turn the many errors of an unreachable hub (offline mode, refused connections, time-outs, at
        any point of a stream) into one ``HubUnreachable`` that says how to ingest a local copy instead."""
        if self.local:
            yield
            return
        try:
            yield
        except Exception as error:
            if not _unreachable(error):
                raise
            raise HubUnreachable(
                f"cannot reach the Hugging Face hub for {self.location!r} ({type(error).__name__}); without network, "
                f"copy its Parquet files ({{subset}}/{self.split}-*.parquet) or a `save_to_disk` folder to this machine "
                f"and run `engine ingest FOLDER`"
            ) from None

    def rows(self) -> Iterator[RawRow]:
        for subset in self.subsets:
            row = 0
            with self._reaching_the_hub():
                for batch in self._open(subset).iter(batch_size=READ_BATCH):
                    missing = {"images", "texts"} - set(batch.column_names)
                    if missing:
                        raise ValueError(f"{self.location} [{subset}]: not in the Cauldron schema, missing {sorted(missing)}")
                    yield from _rows_of(batch, subset, self.split, row)
                    row += batch.num_rows


def open_source(location: str, name: str = "cauldron", subsets: list[str] | None = None, split: str = "train") -> Source:
    """Pick the reader for a location: Parquet file/folder, ``save_to_disk`` folder, or hub dataset id."""
    path = Path(location)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return HubSource(location, name, subsets, split)
    if path.exists():
        return ParquetFolderSource(path, name, subsets, split)
    if "/" not in location:
        raise FileNotFoundError(f"{location!r} is neither a local path nor a hub dataset id (owner/name)")
    return HubSource(location, name, subsets, split)
