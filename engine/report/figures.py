"""Plots and images of the report: matplotlib figures saved as PNGs in the folder next to the page and
inlined as data URIs, and histograms counted in DuckDB (bins by ``floor``), so a distribution over a
million rows reaches Python as a few dozen counts."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np

from engine.report.page import Figure

BINS = 40


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Canvas:
    """Saves figures and thumbnails into ``folder`` under unique names, returning page blocks."""

    def __init__(self, folder: Path, public_name: str | None = None):
        import matplotlib

        matplotlib.use("Agg")
        self.folder = folder
        self.public_name = public_name or folder.name  # the folder's name once it is moved into place
        self.folder.mkdir(parents=True, exist_ok=True)

    def figure(self, name: str, figure, title: str, note: str = "") -> Figure:
        """Save a matplotlib figure as ``{name}.png`` and close it."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.tight_layout()
        # no Software/date metadata, so the same store gives the same bytes
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        plt.close(figure)
        png = buffer.getvalue()
        path = self.folder / f"{name}.png"
        path.write_bytes(png)
        return Figure(title, f"{self.public_name}/{path.name}", data_uri(png), note)

    def thumbnail(self, name: str, image_bytes: bytes, size: int = 192) -> dict | None:
        """A downscaled PNG of an encoded image (``None`` when it does not decode)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image_bytes)) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
        except Exception:  # noqa: BLE001 - PIL raises many kinds; an undecodable example is just left out
            return None
        png = buffer.getvalue()
        path = self.folder / f"{name}.png"
        path.write_bytes(png)
        return {"data_uri": data_uri(png), "file": f"{self.public_name}/{path.name}"}


def subplots(columns: int = 1, rows: int = 1, width: float = 5.2, height: float = 3.4):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    return figure, axes.ravel()


def histogram(con, relation: str, value: str, group: str = "'all'", bins: int = BINS, log: bool = False,
              where: str = "true", discrete: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Counts of ``value`` per ``group`` in equal bins, counted in DuckDB.

    The bins span the 0.5th to 99.5th percentile of all groups together (so groups share an axis and a
    few outliers do not squeeze the rest); values beyond land in the edge bins. With ``log`` the bins are
    over log10 of the (positive) values; with ``discrete`` (integer values) each bin spans whole units.

    Returns
    -------
    The bin edges and ``{group: counts}``, or ``None`` when no row has a finite value.
    """
    expression = f"log10({value})" if log else f"({value})"
    valid = f"({where}) and {value} is not null and isfinite({value}::DOUBLE)" + (f" and {value} > 0" if log else "")
    low, high = con.execute(
        f"select quantile_cont({expression}, 0.005), quantile_cont({expression}, 0.995) from {relation} where {valid}"
    ).fetchone()
    if low is None:
        return None
    if discrete:  # integer values: bins of whole units centred on them, so no bin falls between two integers
        width = float(max(1, math.ceil((math.floor(high) - math.ceil(low) + 1) / bins)))
        low = math.ceil(low) - 0.5
        bins = max(1, math.ceil((math.floor(high) + 0.5 - low) / width))
        high = low + bins * width
    elif high - low < 1e-12:  # one value: a bin of width 1 around it
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    counted = con.execute(
        f"""select ({group})::VARCHAR as g, least(greatest(floor(({expression} - {low!r}) / {width!r}), 0), {bins - 1})::INT as b,
        count(*) as n from {relation} where {valid} group by all order by all"""
    ).fetchall()
    counts: dict[str, np.ndarray] = {}
    for name, index, n in counted:
        counts.setdefault(name, np.zeros(bins, np.int64))[index] = n
    return np.linspace(low, high, bins + 1), counts


def draw_histogram(axis, edges: np.ndarray, counts: dict[str, np.ndarray], density: bool = True) -> None:
    """One step line per group (as shares of the group's rows when ``density``), so groups of very
    different sizes compare."""
    for name, values in counts.items():
        heights = values / max(values.sum(), 1) if density else values
        axis.stairs(heights, edges, label=f"{name} ({values.sum():,})")
    axis.set_ylabel("share of rows" if density else "rows")
