"""``engine image-stats``: brightness and contrast of each sample's first image, into ``image_stats`` (joined
into ``facts``, so a recipe can drop near-black or flat images: ``where: "brightness > 0.05"``). The README
shows this class as the example of adding a stage."""

import numpy as np
import pyarrow as pa

from engine.stages.base import Stage, StageOutput, decode_rows


class ImageStats(Stage):
    """Brightness and contrast of each sample's first image (mean and standard deviation of its grey levels, 0-1)."""

    name = "image-stats"
    table = "image_stats"  # declared in schemas/store.yaml
    reads = ("images",)  # read from `samples` by position, batch by batch

    def process(self, batch: pa.Table) -> StageOutput:
        rows, images, rejects = decode_rows(batch)  # an image that does not decode becomes a reject
        grey = [np.asarray(decoded[0].convert("L"), np.float32) / 255 for decoded in images]
        return StageOutput(pa.table({
            "sample_id": pa.array([row["sample_id"] for row in rows], pa.string()),
            "brightness": pa.array([g.mean() for g in grey], pa.float32()),
            "contrast": pa.array([g.std() for g in grey], pa.float32()),
        }), rejects)
