"""The default executor: the stage runs in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from engine.stages.base import Reader, Stage, StageOutput, read_ahead


class LocalExecutor:
    """``setup()`` once, then every batch in selection order, the next batch read ahead on a thread."""

    name = "local"

    def close(self) -> None:
        """Nothing to release."""

    def run(self, stage: Stage, selection: pa.Table, reader: Reader | None, batch_rows: int) -> Iterator[StageOutput]:
        if not len(selection):
            return
        stage.setup()
        for batch in read_ahead(selection, reader, batch_rows):
            yield stage.run_batch(batch)

    def stream(self, work: Callable[[object], Iterator[StageOutput]], items: Iterable) -> Iterator[StageOutput]:
        """``work(item)``'s outputs for each item, one item after the other (ingest's shards)."""
        for item in items:
            yield from work(item)
