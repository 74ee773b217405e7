"""``engine export``: a built mixture as a Hugging Face dataset folder, Parquet, or a TRL-style
``messages`` view, optionally pushed to the hub. Streams the mixture's Parquet shards; publishes atomically."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from engine.query import make_parent
from engine.sql import sql_literal
from engine.recipes.output import MIXTURE_SCHEMA, MixtureWriter, mixture_features, publish

FORMATS = ("hf", "parquet", "messages")

# One user message per turn (the first carries one {"type": "image"} per image), one assistant message.
MESSAGES_SQL = """
select images,
       flatten(list_transform(texts, lambda t, i: [
           struct_pack(role := 'user',
                       content := list_concat(
                           case when i = 1 then list_transform(range(len(images)),
                                                               lambda x: struct_pack(type := 'image', text := NULL::VARCHAR))
                                else [] end,
                           [struct_pack(type := 'text', text := t.user)])),
           struct_pack(role := 'assistant', content := [struct_pack(type := 'text', text := t.assistant)])
       ])) as messages,
       sample_id, source, subset, category, captioned, origin_id, perturbation
from read_parquet({files})
"""
CONTENT = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGES_SCHEMA = pa.schema(
    [MIXTURE_SCHEMA.field("images"), ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", CONTENT)])))]
    + [MIXTURE_SCHEMA.field(name) for name in ("sample_id", "source", "subset", "category", "captioned", "origin_id", "perturbation")]
)


def messages_features() -> dict:
    """HF features of the messages view (derived from the mixture's)."""
    base = copy.deepcopy(mixture_features())
    value = {"dtype": "string", "_type": "Value"}
    content = {"feature": {"type": value, "text": value}, "_type": "List"}
    features = {"images": base["images"], "messages": {"feature": {"role": value, "content": content}, "_type": "List"}}
    features.update({k: base[k] for k in ("sample_id", "source", "subset", "category", "captioned", "origin_id", "perturbation")})
    return features


class ExportError(RuntimeError):
    pass


def mixture_files(mixture: Path) -> list[Path]:
    """The Parquet shards of a built mixture (its ``parquet/`` folder)."""
    if not (mixture / "manifest.json").exists():
        raise ExportError(f"{mixture} is not a built mixture (no manifest.json); run `engine build RECIPE` first")
    files = sorted((mixture / "parquet").glob("part-*.parquet"))
    if not files:
        raise ExportError(f"{mixture} has no Parquet shards; build it with output.formats including parquet")
    return files


def export(mixture: str | Path, out: str | Path, format: str = "hf", push: str | None = None,
           shard_rows: int = 100_000) -> Path:
    """Write a built mixture in ``format`` to ``out`` (and push it to the hub as repo ``push``)."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {FORMATS}")
    mixture, out = Path(mixture), Path(out)
    files = mixture_files(mixture)
    manifest = json.loads((mixture / "manifest.json").read_text())
    try:  # a missing parent folder is created, as people expect of `--out new/folder`
        make_parent(out)
    except OSError as error:
        raise ExportError(f"cannot write {out}: {error}") from None
    tmp = out.parent / f".{out.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if format == "parquet":
            for path in files:
                shutil.copyfile(path, tmp / path.name)
        else:
            listing = "[" + ", ".join(sql_literal(str(p)) for p in files) + "]"
            total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
            if format == "messages":
                sql, schema, features = MESSAGES_SQL.format(files=listing), MESSAGES_SCHEMA, messages_features()
            else:
                sql, schema, features = f"select * from read_parquet({listing})", MIXTURE_SCHEMA, mixture_features()
            writer = MixtureWriter(tmp, ["hf"], total, shard_rows, f"{manifest['recipe_sha256'][:12]}-{format}",
                                   schema=schema, features=features, hf_dir=".")
            con = duckdb.connect()
            for batch in con.sql(sql).to_arrow_reader(65536):
                writer.write(pa.Table.from_batches([batch]).cast(schema))
            writer.close()
            con.close()
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push:
        push_to_hub(out, push, format)
    return out


def push_to_hub(folder: Path, repo: str, format: str) -> None:
    """Upload an exported folder as a hub dataset; needs a token and network."""
    import datasets
    from huggingface_hub import get_token

    if not get_token():
        raise ExportError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    if format == "parquet":
        dataset = datasets.Dataset.from_parquet([str(p) for p in sorted(folder.glob("*.parquet"))])
    else:
        dataset = datasets.load_from_disk(str(folder))
    try:
        dataset.push_to_hub(repo)
    except Exception as error:  # network and permission failures come in many types
        raise ExportError(f"push to {repo!r} failed: {type(error).__name__}: {error}") from None
