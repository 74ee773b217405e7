"""Writing a mixture: Parquet shards and a Hugging Face ``save_to_disk`` folder from one stream of Arrow
tables, each file hashed (SHA-256) as it is written, the two formats written on two threads.

The HF folder is the format ``datasets.load_from_disk`` reads (Arrow IPC stream shards, ``state.json``,
``dataset_info.json``); writing it directly avoids a second pass over the data. Both formats carry the
HF features in their schema metadata, so ``load_dataset("parquet", ...)`` also decodes the images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.paths import SCHEMAS_DIR

class ManifestError(ValueError):
    """A folder that holds no readable mixture manifest; the message names the file."""


def read_manifest(folder: str | Path) -> tuple[dict, str]:
    """The ``manifest.json`` of a mixture folder ``engine build`` wrote, and the SHA-256 of its bytes (the
    hash ``engine build`` prints). Raises ``ManifestError`` naming the file when it is missing or not a JSON
    object; callers check the keys they read."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{Path(folder)} is not a built mixture (no manifest.json); run `engine build RECIPE` first")
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a JSON object; is this a mixture manifest?")
    return manifest, hashlib.sha256(data).hexdigest()


TURN = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MIXTURE_COLUMNS = [
    ("images", pa.list_(HF_IMAGE)),
    ("texts", pa.list_(TURN)),
    ("sample_id", pa.string()),
    ("source", pa.string()),
    ("subset", pa.string()),
    ("category", pa.string()),
    ("task_kind", pa.string()),
    ("label", pa.string()),
    ("captioned", pa.bool_()),
    ("origin_id", pa.string()),  # a perturbed variant: the sample it was made from
    ("perturbation", pa.string()),  # a perturbed variant: which perturbation
]
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())  # in temp folder names: whose build it was
CHUNK_ROWS = 65536  # every write is this many rows (the last one fewer), so files never depend on input batching


@cache
def mixture_features() -> dict:
    """HF ``datasets`` features of a mixture (``schemas/mixture.features.json``)."""
    return json.loads((SCHEMAS_DIR / "mixture.features.json").read_text())


def with_features(schema: pa.Schema, features: dict) -> pa.Schema:
    """Attach HF features as schema metadata, where ``datasets`` looks for them."""
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}}, sort_keys=True)})


MIXTURE_SCHEMA = pa.schema(MIXTURE_COLUMNS)


class _HashingFile:
    """A binary file that hashes what is written to it (no second read for the manifest)."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.position = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.handle.write(view)
        self.position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        if not self.closed:
            self.handle.close()
            self.closed = True


class _ShardedWriter:
    """Rows into numbered shard files of at most ``shard_rows`` rows each."""

    def __init__(self, folder: Path, names: list[str], open_writer, shard_rows: int):
        self.folder, self.names, self.open_writer, self.shard_rows = folder, names, open_writer, shard_rows
        self.shard, self.in_shard, self.file, self.writer, self.buffered = 0, 0, None, None, None
        self.hashes: dict[str, str] = {}

    def _open(self) -> None:
        self.file = _HashingFile(self.folder / self.names[self.shard])
        # Arrow writes many small buffers; gathering them in 8 MB chunks keeps the Python-level hashing
        # file (and the GIL it needs) out of the hot path
        self.buffered = pa.BufferedOutputStream(pa.PythonFile(self.file, mode="w"), buffer_size=8 << 20)
        self.writer = self.open_writer(self.buffered)

    def _close_shard(self) -> None:
        self.writer.close()
        self.buffered.close()  # flushes the last chunk into the hashing file
        self.file.close()
        self.hashes[self.names[self.shard]] = self.file.digest.hexdigest()
        self.file, self.writer = None, None
        self.shard, self.in_shard = self.shard + 1, 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < len(table):
            if self.writer is None:
                self._open()
            piece = table.slice(offset, self.shard_rows - self.in_shard)
            self.writer.write_table(piece)
            offset += len(piece)
            self.in_shard += len(piece)
            if self.in_shard == self.shard_rows:
                self._close_shard()

    def close(self) -> dict[str, str]:
        if self.writer is not None:
            self._close_shard()
        while self.shard < len(self.names):  # an empty output still gets its (empty) shard
            self._open()
            self._close_shard()
        return self.hashes


class MixtureWriter:
    """Write a known number of rows as Parquet (``parquet/part-NNNNN.parquet``) and/or an HF dataset
    folder (``hf/``), returning ``{relative path: sha256}`` of every file written.

    Parameters
    ----------
    out
        Folder to write into (a temp folder that is published afterwards).
    total
        Rows that will be written; fixes the shard names up front.
    fingerprint
        The HF dataset fingerprint (derived from the recipe and store versions: deterministic).
    """

    def __init__(self, out: Path, formats: list[str], total: int, shard_rows: int, fingerprint: str,
                 schema: pa.Schema = MIXTURE_SCHEMA, features: dict | None = None, hf_dir: str = "hf"):
        self.out, self.formats, self.fingerprint = out, formats, fingerprint
        self.features = features or mixture_features()
        self.schema = with_features(schema, self.features)
        self.hf_dir = hf_dir
        n_shards = max(1, math.ceil(total / shard_rows))
        self.writers: dict[str, _ShardedWriter] = {}
        if "parquet" in formats:
            folder = out / "parquet"
            folder.mkdir(parents=True)
            names = [f"part-{i:05d}.parquet" for i in range(n_shards)]
            self.writers["parquet"] = _ShardedWriter(
                folder, names, lambda f: pq.ParquetWriter(f, self.schema, compression="zstd", compression_level=1), shard_rows
            )
        if "hf" in formats:
            folder = out / hf_dir
            folder.mkdir(parents=True, exist_ok=True)
            names = [f"data-{i:05d}-of-{n_shards:05d}.arrow" for i in range(n_shards)]
            self.writers["hf"] = _ShardedWriter(folder, names, lambda f: pa.ipc.new_stream(f, self.schema), shard_rows)
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.writers)))
        self.pending: list[Future] = []
        self.buffer: list[pa.Table] = []
        self.buffered = 0

    def _drain(self) -> None:
        for future in self.pending:
            future.result()
        self.pending = []

    def _submit(self, table: pa.Table) -> None:
        self._drain()  # at most one chunk in flight per format: bounded memory
        self.pending = [self.pool.submit(writer.write, table) for writer in self.writers.values()]

    def write(self, table: pa.Table) -> None:
        """Queue rows (already in MIXTURE order); writes happen in fixed chunks of ``CHUNK_ROWS``."""
        self.buffer.append(table)
        self.buffered += len(table)
        while self.buffered >= CHUNK_ROWS:
            merged = pa.concat_tables(self.buffer)
            self._submit(merged.slice(0, CHUNK_ROWS).combine_chunks())
            rest = merged.slice(CHUNK_ROWS)
            self.buffer, self.buffered = [rest], len(rest)

    def close(self) -> dict[str, str]:
        if self.buffered:
            self._submit(pa.concat_tables(self.buffer).combine_chunks())
        self._drain()
        self.pool.shutdown()
        hashes = {}
        for kind, writer in self.writers.items():
            folder = "parquet" if kind == "parquet" else self.hf_dir
            hashes.update({f"{folder}/{name}": digest for name, digest in writer.close().items()})
        if "hf" in self.writers:
            hashes.update(self._hf_metadata(list(self.writers["hf"].names)))
        return dict(sorted(hashes.items()))

    def _hf_metadata(self, shard_names: list[str]) -> dict[str, str]:
        state = {
            "_data_files": [{"filename": name} for name in shard_names],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        info = {"citation": "", "description": "", "features": self.features, "homepage": "", "license": ""}
        hashes = {}
        for name, body in (("state.json", state), ("dataset_info.json", info)):
            text = json.dumps(body, indent=2, sort_keys=True)
            (self.out / self.hf_dir / name).write_text(text)
            hashes[f"{self.hf_dir}/{name}"] = hashlib.sha256(text.encode()).hexdigest()
        return hashes


def publish(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; the old folder (if any) is removed only afterwards."""
    old = final.parent / f".{final.name}.old-{_HOST}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


class OutputRefused(ValueError):
    """``output.path`` names something a build must not replace; the message says what, in one line."""


def check_output_path(final: Path, store_root: Path) -> None:
    """Refuse to publish over anything but a mixture this engine wrote.

    Publishing replaces the folder at ``final``, so it may only be: absent, an empty folder, or a folder
    whose every file is ``manifest.json`` or one the manifest lists (a mixture this engine built, with
    nothing added since). Never the store, a folder inside it, or a folder that contains it.

    Raises
    ------
    OutputRefused
    """
    target, store = final.resolve(), store_root.resolve()
    if target == store or target in store.parents:
        raise OutputRefused(f"{final} {'is' if target == store else 'contains'} the store {store_root}; choose a folder of its own")
    if store in target.parents:
        raise OutputRefused(f"{final} is inside the store {store_root}; choose a folder outside it")
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir():
        raise OutputRefused(f"{final} exists and is not a folder; a build publishes a folder there")
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if not p.is_dir())
    if not files:
        return
    try:
        manifest = json.loads((final / "manifest.json").read_text())
        listed = set(manifest["files"]) | {"manifest.json"}
        manifest["recipe_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputRefused(f"{final} exists and is not a mixture this engine built (no readable manifest.json); "
                            "choose another path, or remove it yourself") from None
    foreign = [name for name in files if name not in listed]
    if foreign:
        raise OutputRefused(f"{final} holds files the mixture's manifest does not list (e.g. {foreign[0]}); "
                            "a build would delete them: move them, or choose another path")



def temp_folder(final: Path) -> Path:
    """Where a build writes before publishing: ``.{name}.tmp-{host}-{pid}`` next to ``final``."""
    return final.parent / f".{final.name}.tmp-{_HOST}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove the temp folders killed builds of ``final`` left behind; returns what was removed.

    Only folders named as this engine names them (``temp_folder``, and ``publish``'s ``.old-`` folder)
    whose process ran on this host and is gone are touched (a live or foreign build keeps its folder).
    A stale ``.old-`` folder is a previously published mixture that a kill caught mid-swap: it is put
    back when ``final`` is missing, and removed otherwise.
    """
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-(?:([A-Za-z0-9_.]+)-)?(\d+)")
    removed = []
    if not final.parent.is_dir():
        return removed
    for path in sorted(final.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or match.group(2) not in (None, _HOST) or _alive(int(match.group(3))):
            continue
        if match.group(1) == "old" and not final.exists():
            path.rename(final)
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed
