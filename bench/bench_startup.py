"""Start-up time of the command line: each command in a fresh process, timed end to end.

The heavy libraries' own import times are timed beside the commands, since they are what a command
that imported them eagerly would pay before doing anything: `engine --help` used to import the store,
hence lancedb; `engine query` needs only lance, DuckDB and pyarrow (DuckDB draws the table, the csv module
writes CSV) and loads pyarrow.dataset without pandas (``engine.query.defer_pandas``). The machine's load
average is printed before and after: on a shared machine the figures move with it.

    python bench/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str], repeats: int, env: dict) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        subprocess.run([sys.executable, "-c", "from engine.stages.ingest import ingest_sample; from engine.store import Store; "
                        f"ingest_sample(Store({str(store)!r}), {str(Path(scratch) / 'sample')!r}, scale=0.1, progress=False)"],
                       env=env, check=True)
        engine = [sys.executable, "-m", "engine.cli", "--store", str(store)]
        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], None),
            ("import click", [sys.executable, "-c", "import click"], None),
            ("engine --help", [*engine, "--help"], 0.3),
            ("engine --version", [*engine, "--version"], 0.3),
            ("engine query (380 rows, table)", [*engine, "query", "select category, count(*) from facts group by 1"], 0.5),
            ("engine query (380 rows, csv)", [*engine, "query", "select count(*) from samples", "--format", "csv"], 0.5),
            ("import duckdb, pyarrow", [sys.executable, "-c", "import duckdb, pyarrow"], None),
            ("import lance", [sys.executable, "-c", "import lance"], None),
            ("import lance, duckdb (no pandas)", [sys.executable, "-c", "from engine.query import defer_pandas; "
                                                  "defer_pandas(); import lance, duckdb"], None),
            ("import pandas", [sys.executable, "-c", "import pandas"], None),
            ("import lancedb", [sys.executable, "-c", "import lancedb"], None),
            ("import engine.store, lancedb", [sys.executable, "-c", "import engine.store, lancedb"], None),
        ]
        print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
        print(f"{'command':<34}{'median s':>10}{'min s':>8}{'target s':>10}")
        for label, argv, target in rows:
            seconds = timed(argv, args.repeats, env)
            mark = "" if target is None else f"{target:>10.1f}"
            print(f"{label:<34}{statistics.median(seconds):>10.3f}{min(seconds):>8.3f}{mark}")
        print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
