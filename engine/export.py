"""``engine export``: a built mixture as a Hugging Face dataset folder, Parquet shards, or a TRL-style
``messages`` view, optionally pushed to the hub. Streams the mixture's Parquet shards; publishes atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from engine.recipes.build import OUTPUT_SCHEMA, hf_features, publish, write_hf_dataset

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
       sample_id, source, subset, category, captioned
from read_parquet({files})
"""


def messages_features():
    import datasets

    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    features = hf_features()
    return datasets.Features(
        {
            "images": features["images"],
            "messages": datasets.List({"role": datasets.Value("string"), "content": content}),
            **{k: features[k] for k in ("sample_id", "source", "subset", "category", "captioned")},
        }
    )


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


def export(mixture: str | Path, out: str | Path, format: str = "hf", push: str | None = None, batch_rows: int = 4096) -> Path:
    """Write a built mixture in ``format`` to ``out`` (and push it to the hub as repo ``push``)."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {FORMATS}")
    mixture, out = Path(mixture), Path(out)
    files = mixture_files(mixture)
    manifest = json.loads((mixture / "manifest.json").read_text())
    fingerprint = f"{manifest['recipe_sha256'][:12]}-{format}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if format == "parquet":
            for path in files:
                shutil.copyfile(path, tmp / path.name)
        else:
            stream_path = tmp / "stream.arrow"
            con = duckdb.connect()
            listing = "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in files) + "]"
            sql = MESSAGES_SQL.format(files=listing) if format == "messages" else f"select * from read_parquet({listing})"
            reader = con.sql(sql).to_arrow_reader(batch_rows)
            features = messages_features() if format == "messages" else hf_features()
            schema = features.arrow_schema if format == "messages" else OUTPUT_SCHEMA
            with pa.ipc.new_stream(str(stream_path), schema) as stream:
                for batch in reader:
                    stream.write_table(pa.Table.from_batches([batch]).cast(schema))
            con.close()
            write_hf_dataset(stream_path, tmp / "dataset", fingerprint, features)
            stream_path.unlink()
            for item in (tmp / "dataset").iterdir():
                item.rename(tmp / item.name)
            (tmp / "dataset").rmdir()
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
        dataset = datasets.Dataset.from_parquet([str(p) for p in sorted(folder.glob("*.parquet"))], features=hf_features())
    else:
        dataset = datasets.load_from_disk(str(folder))
    try:
        dataset.push_to_hub(repo)
    except Exception as error:  # network and permission failures come in many types
        raise ExportError(f"push to {repo!r} failed: {type(error).__name__}: {error}") from None


def read_rows(folder: str | Path) -> pa.Table:
    """All rows of a mixture's Parquet shards (for inspection and tests)."""
    return pq.read_table(mixture_files(Path(folder))[0].parent)
