"""What a source is: something that yields raw rows (``Source``, ``RawRow``) and says which parts of it can be
read on their own (``Shard``), and the check that turns a raw row into the columns of ``samples`` or a reject
reason (``check_row``). The ingest stage (``engine.stages.ingest``) runs sources into the store."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from engine.images import MAX_IMAGE_BYTES, ImageError, read_image_file, standardize


@dataclass
class RawRow:
    """A row as a source delivers it, before checks.

    ``images`` holds encoded bytes, or Hugging Face image dicts ``{"bytes": ..., "path": ...}``;
    ``texts`` holds Cauldron turns ``{"user", "assistant", "source"}``. ``error`` is set (and the
    rest left empty) when the source could not read the row at all, e.g. text that is not valid UTF-8:
    the row is rejected with it as the reason, and the rows around it are ingested.
    """

    subset: str
    split: str
    row: int
    images: list
    texts: list
    label: str | None = None
    error: str | None = None


@dataclass
class Shard:
    """A part of a source that can be read on its own, in another process: ``reader.rows()`` yields its rows
    (``reader`` is a picklable ``Source``), and a source's shards, read one after the other, yield exactly
    the rows of ``Source.rows()`` in the same order.

    When the shard knows which ids it holds (``{prefix}{row}`` for ``row`` from ``start``, ``count`` of them;
    ``count`` None: not known without reading), the ingest driver hands its worker only the done ids among
    them, and a shard done to its last row is not read at all.
    """

    reader: "Source"
    prefix: str | None = None
    start: int = 0
    count: int | None = None


class Source(ABC):
    """Something rows can be ingested from. Subclasses say what they read and yield ``RawRow``s in a
    stable order, so that ``{source}:{subset}:{split}:{row}`` names the same row on every run."""

    name: str

    @abstractmethod
    def rows(self) -> Iterator[RawRow]:
        """Yield the rows, streaming (never the whole source in memory)."""

    def total(self) -> int | None:
        """Number of rows, when known cheaply (for the progress bar)."""
        return None

    def shards(self) -> list[Shard]:
        """The parts of the source that can be read in parallel, in order (a source that has no natural
        parts is one shard: itself)."""
        return [Shard(self, count=self.total())]

    def config(self) -> dict:
        """What the run read, for the ``runs`` table."""
        return {"source": self.name}

    def sample_id(self, raw: RawRow) -> str:
        return f"{self.name}:{raw.subset}:{raw.split}:{raw.row}"

    # a source that carries its own captions names their captioner and yields (sample_id, caption) pairs
    captioner: str | None = None
    caption_prompt_id: str | None = None

    def captions(self) -> Iterator[tuple[str, str]]:
        return iter(())


class RowError(ValueError):
    """A row that cannot be ingested; the message is its reject reason."""


def _image_bytes(item, max_bytes: int) -> bytes | None:
    """The encoded bytes of an image item; a ``path`` is read only if it is a regular file within the cap."""
    if isinstance(item, dict):
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path"):
            return read_image_file(item["path"], max_bytes)
        return None
    return item


def check_row(raw: RawRow, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict:
    """Turn a raw row into the columns of ``samples`` (without ids), or raise ``RowError`` saying why not.

    ``max_image_bytes`` caps each encoded image (read from a path or given as bytes)."""
    if raw.error:
        raise RowError(raw.error)
    if not raw.images:
        raise RowError("row has no image")
    images = []
    sizes = []
    for index, item in enumerate(raw.images):
        try:
            data, width, height = standardize(_image_bytes(item, max_image_bytes), max_image_bytes)
        except ImageError as error:
            raise RowError(f"image {index}: {error}") from None
        images.append(data)
        sizes.append((width, height))
    if not raw.texts:
        raise RowError("row has no turns")
    turns = []
    for index, turn in enumerate(raw.texts):
        assistant = (turn or {}).get("assistant")
        if not isinstance(assistant, str) or not assistant.strip():
            raise RowError(f"turn {index} has no answer")
        turns.append({"user": turn.get("user") or "", "assistant": assistant, "source": turn.get("source")})
    return {
        "images": images,
        "turns": turns,
        "label": raw.label,
        "width": sizes[0][0],
        "height": sizes[0][1],
        "n_images": len(images),
    }
