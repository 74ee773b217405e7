"""Benchmark: the local executor against ``--executor ray`` on one machine, side by side in one run.

Two workloads, each run as a user runs it (``engine ...`` in a fresh process, timed by the wall clock, on a
fresh copy of the same store): ``embed --model classical`` over 5,000 rows and ``caption`` with the tiny
test model (random weights, built from config) over 1,000 rows. Each executor runs each workload twice,
over a few rows and over all of them, so a run's time splits into a fixed start-up (Python, imports, store;
for Ray also starting the local cluster and its actors) and a cost per row:

    per row = (T(all) - T(few)) / (all - few),   fixed = T(few) - few * per row

Ray runs two ways: ``ray`` starts a local cluster inside the command (what ``--executor ray`` alone does),
``ray-joined`` joins one that this benchmark started beforehand (``--ray-address``: a cluster kept running,
as on a real deployment, so the command pays only for its actors). The target of the scale-out design is
Ray's overhead on one node <= 1.3x local; the table gives the ratio
ray/local for the whole run and for the per-row cost. The machine's load average is printed: on a shared
machine the figures move with it.

    python bench/bench_executors.py [--embed-rows 5000] [--caption-rows 1000] [--workers 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FEW = {"embed": 128, "caption": 32}


def engine(store: Path, *args: str) -> float:
    """Seconds one ``engine`` command takes, start to end, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)  # `ray` starts its own cluster; `ray-joined` names this benchmark's
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "--store", str(store), *args, "--quiet"], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"engine {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def workloads(store: Path, model: Path, embed_rows: int, caption_rows: int) -> dict[str, dict[int, list[str]]]:
    """The command of each workload, for a few rows and for all: embed takes the first ids (``--where``),
    caption takes ``--limit`` rows."""
    from engine.store import Store

    con, _ = Store(store).connect()
    ids = [row[0] for row in con.execute("select sample_id from facts order by sample_id").fetchall()]
    if len(ids) < embed_rows:
        raise SystemExit(f"the store holds {len(ids)} rows, fewer than --embed-rows {embed_rows}")

    def embed(rows: int) -> list[str]:
        last = ids[rows - 1].replace("'", "''")
        return ["embed", "--model", "classical", "--modality", "image", "--batch-size", "64",
                "--where", f"sample_id <= '{last}'"]

    def caption(rows: int) -> list[str]:
        return ["caption", "--model", str(model), "--batch-size", "16", "--max-new-tokens", "16", "--limit", str(rows)]

    return {"embed": {FEW["embed"]: embed(FEW["embed"]), embed_rows: embed(embed_rows)},
            "caption": {FEW["caption"]: caption(FEW["caption"]), caption_rows: caption(caption_rows)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embed-rows", type=int, default=5000)
    parser.add_argument("--caption-rows", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (one node: 1 is the like-for-like figure)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (the fastest is kept)")
    args = parser.parse_args()
    import ray

    # the joined cluster: started here, with the CPUs the command's own local cluster would have
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    ray_options = ["--executor", "ray", "--workers", str(args.workers)]
    executors = {"local": [], "ray": ray_options, "ray-joined": [*ray_options, "--ray-address", address]}
    with tempfile.TemporaryDirectory() as tmp:
        from engine.models.tiny import build_tiny_smolvlm
        from engine.stages.ingest import ingest_sample
        from engine.store import Store

        template = Path(tmp) / "template"
        ingest_sample(Store(template), Path(tmp) / "sample", scale=args.embed_rows / 3800 * 1.02, progress=False)
        model = build_tiny_smolvlm(Path(tmp) / "tiny")
        seconds: dict[tuple[str, str, int], float] = {}
        for stage, commands in workloads(template, model, args.embed_rows, args.caption_rows).items():
            for rows, command in commands.items():
                for _ in range(args.repeats):
                    for name, options in executors.items():  # side by side: local, then ray, on the same rows
                        store = Path(tmp) / "store"
                        shutil.rmtree(store, ignore_errors=True)
                        shutil.copytree(template, store)
                        took = engine(store, *command, *options)
                        key = (stage, name, rows)
                        seconds[key] = min(seconds.get(key, took), took)
                        print(f"  {stage} {name} {rows} rows: {took:.2f} s", file=sys.stderr, flush=True)
    ray.shutdown()
    report(seconds, args, list(executors))


def report(seconds: dict[tuple[str, str, int], float], args, executors: list[str]) -> None:
    load = os.getloadavg()
    print(f"one machine, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.workers} Ray worker(s); wall clock of `engine ...` in a fresh process")
    print(f"{'stage':<9}{'executor':<12}{'rows':>6}{'seconds':>9}{'rows/s':>9}{'fixed s':>9}{'ms/row':>8}"
          f"{'ray/local':>11}{'per row':>9}")
    for stage, rows in (("embed", args.embed_rows), ("caption", args.caption_rows)):
        few = FEW[stage]
        figures = {}
        for name in executors:
            total, small = seconds[(stage, name, rows)], seconds[(stage, name, few)]
            per_row = (total - small) / (rows - few)
            figures[name] = (total, per_row, small - few * per_row)
        for name, (total, per_row, fixed) in figures.items():
            ratio = f"{total / figures['local'][0]:>10.2f}x{per_row / figures['local'][1]:>8.2f}x" if name != "local" else ""
            print(f"{stage:<9}{name:<12}{rows:>6}{total:>9.2f}{rows / total:>9.1f}{fixed:>9.2f}{per_row * 1e3:>8.2f}{ratio}")


if __name__ == "__main__":
    main()
