"""``engine report``: one self-contained HTML page (plots and thumbnails inlined as data URIs) that shows
a store, a built mixture and an eval run, plus the PNGs in a folder next to it. Each section appears only
when its table (or file) exists; every number is an aggregate computed in DuckDB."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.report.mixture import ReportError
from engine.report.store_sections import runs_sql

__all__ = ["ReportError", "ReportResult", "runs_sql", "write_report"]

# written by a later stage (engine attribute); declared in schemas/store.yaml once it lands
OPTIONAL_TABLES = ("attributions",)


@dataclass
class ReportResult:
    path: Path
    folder: Path
    sections: list[str]
    images: int


def write_report(store, out: str | Path, mixture: str | Path | None = None, eval_dir: str | Path | None = None) -> ReportResult:
    """Write the report page to ``out`` and its PNGs to ``{out stem}_files/`` beside it.

    Parameters
    ----------
    store
        The :class:`engine.store.Store` to describe.
    out
        The HTML file to write.
    mixture
        A folder ``engine build`` wrote (its ``manifest.json`` is read).
    eval_dir
        A folder ``engine eval --out`` wrote (its ``report.json`` and ``predictions.parquet`` are read).

    Raises
    ------
    ReportError
        A mixture or eval folder that cannot be read; nothing is written then.
    """
    from engine.report.evaluation import eval_section, read_eval
    from engine.report.figures import Canvas
    from engine.report.mixture import mixture_section, read_manifest
    from engine.report.page import render
    from engine.report.store_sections import (attributions_section, captions_section, interactions_section, light_facts,
                                              store_section, validation_section)

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"{out}: the report is an HTML page; give a path ending in .html")
    # read the inputs first, so a bad folder fails before anything is written
    if mixture is not None:
        read_manifest(Path(mixture))
    if eval_dir is not None:
        read_eval(Path(eval_dir))
    con, versions = store.connect()
    try:
        for name in OPTIONAL_TABLES:
            if name not in versions and store.has(name):
                dataset = store.dataset(name)
                con.register(name, dataset)
                versions[name] = dataset.version
        counts = {name: store.dataset(name).count_rows() for name in versions}
        light_facts(con)
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = out.parent / f"{out.stem}_files"
        staging = out.parent / f".{out.stem}_files.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        canvas = Canvas(staging, folder.name)
        sections = [store_section(store, con, versions, canvas)]
        sections += [s for s in (interactions_section(con, counts, canvas), captions_section(store, con, counts, canvas),
                                 validation_section(con, counts, canvas), attributions_section(con, counts, canvas)) if s]
        if mixture is not None:
            sections.append(mixture_section(Path(mixture), con, versions, canvas))
        if eval_dir is not None:
            sections.append(eval_section(Path(eval_dir), con, canvas))
    except BaseException:
        shutil.rmtree(out.parent / f".{out.stem}_files.tmp", ignore_errors=True)
        raise
    finally:
        con.close()
    html = render("engine report", f"store {store.root} · table versions "
                  + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), sections)
    # replace the previous report's images only once the new ones are all written
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return ReportResult(out, folder, [s.id for s in sections], len(list(folder.glob("*.png"))))
