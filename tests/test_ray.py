"""``--executor ray``: the same stages on a Ray cluster give the same rows as the local executor, resume
exactly once after a kill, spread over nodes, and fail with one clear line; ingest reads a source's shards
on Ray and commits the same store as a local ingest.

One Ray cluster serves the whole module: two simulated nodes of one CPU each (``ray.cluster_utils.Cluster``),
so every Ray test here also runs across nodes. Skipped when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

from engine.stages.base import Stage, StageOutput, reject  # noqa: E402
from engine.stages.executors.local import LocalExecutor  # noqa: E402
from engine.stages.executors.ray import RayExecutor, RayUnavailable  # noqa: E402

from click.testing import CliRunner  # noqa: E402
from conftest import REPO, cauldron_parquet, kill_after_commits, killed_caption_run_resumes_exactly_once, png, qa  # noqa: E402
from engine.cli import main  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test stages travel to the actors by value


@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes of one CPU each, joined by this process; yields the address other processes join with."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


class Lengths(Stage):
    """A toy stage: each id's length and the node that computed it; ids ending in 7 are rejected."""

    name, table = "lengths", "lengths"

    def setup(self) -> None:
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"

    def process(self, batch: pa.Table) -> StageOutput:
        ids = batch.column("sample_id").to_pylist()
        kept = [i for i in ids if not i.endswith("7")]
        rows = pa.table({"sample_id": kept, "length": [len(i) for i in kept], "node": [self.node] * len(kept)})
        return StageOutput(rows=rows, rejects=[reject(i, "ends in 7") for i in ids if i.endswith("7")])


class Broken(Stage):
    name, table = "broken", "broken"

    def process(self, batch: pa.Table) -> StageOutput:
        raise ValueError(f"sample {batch.column('sample_id')[0]}: cannot be processed")


def selection(n: int) -> pa.Table:
    return pa.table({"sample_id": [f"s{i:04d}" for i in range(n)], "pos": pa.array(range(n), pa.int64())})


def test_outputs_come_back_in_selection_order_like_local(ray_cluster):
    chosen = selection(203)
    remote = list(RayExecutor(workers=2).run(Lengths(), chosen, None, 16))
    local = list(LocalExecutor().run(Lengths(), chosen, None, 16))
    assert [o.inputs for o in remote] == [o.inputs for o in local] == [16] * 12 + [11]
    assert [o.rejects for o in remote] == [o.rejects for o in local]
    assert sum(len(o.rejects) for o in remote) == 20
    columns = ["sample_id", "length"]
    assert pa.concat_tables([o.rows.select(columns) for o in remote]).equals(
        pa.concat_tables([o.rows.select(columns) for o in local]))
    # two actors of one CPU each on two nodes of one CPU each: both nodes worked
    assert len({n for o in remote for n in o.rows.column("node").to_pylist()}) == 2


def test_a_stage_error_reaches_the_driver_as_itself(ray_cluster):
    with pytest.raises(ValueError, match="^sample s0000: cannot be processed$"):
        list(RayExecutor(workers=1).run(Broken(), selection(4), None, 4))


def test_an_unreachable_address_fails_at_once_with_one_line():
    with pytest.raises(RayUnavailable, match=r"^no Ray cluster answers at 127\.0\.0\.1:9 \("):
        RayExecutor(address="127.0.0.1:9")
    with pytest.raises(RayUnavailable, match="is not host:port"):
        RayExecutor(address="nowhere")


def test_the_cli_loads_ray_only_for_a_ray_run():
    code = ("import sys\nfrom engine.cli import main\nfrom engine.stages.executors import executor_for\n"
            "executor_for('ray', workers=2)\n"
            "try:\n    main(['embed', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "--executor [local|ray]" in out and out.splitlines()[-1] == "False"


def test_a_pool_the_cluster_cannot_hold_fails_with_what_it_has(ray_cluster):
    executor = RayExecutor(workers=3)
    executor.start_timeout_s = 3
    with pytest.raises(RayUnavailable, match=r"could not start 3 workers of 1 CPU each within 3 s \(it has 2 CPU, 0 GPU\)"):
        list(executor.run(Lengths(), selection(64), None, 16))


# -- the engine's own stages, through the command line ---------------------------------------------------------
def twin(store):
    """A copy of ``store`` (to run the same command on it with the other executor)."""
    from engine.store import Store

    shutil.copytree(store.root, store.root.parent / "twin")
    return Store(store.root.parent / "twin")


def run(store, *args: str) -> str:
    result = CliRunner().invoke(main, ["--store", str(store.root), *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


def rejects(store, stage: str) -> list[tuple[str, str]]:
    return sorted((r["sample_id"], r["reason"]) for r in store.arrow("rejects").to_pylist() if r["stage"] == stage)


def test_embed_on_ray_gives_the_local_vectors(ray_cluster, small_store):
    other = twin(small_store)
    run(small_store, "embed", "--model", "classical", "--modality", "image", "--batch-size", "4")
    out = run(other, "embed", "--model", "classical", "--modality", "image", "--batch-size", "4",
              "--executor", "ray", "--workers", "2")
    assert out.startswith("13 image vectors from classical:")
    local, remote = (s.arrow("embeddings", ["sample_id", "model", "vector"]).sort_by("sample_id") for s in (small_store, other))
    assert len(local) == 13 and remote.equals(local)  # the same floats, bit for bit
    assert rejects(other, "embed") == rejects(small_store, "embed") == [
        ("cauldron:vqav2:train:99", rejects(small_store, "embed")[0][1])]


@pytest.mark.slow
def test_caption_on_ray_gives_the_local_captions(ray_cluster, small_store, tiny_vlm):
    other = twin(small_store)
    args = ["caption", "--model", tiny_vlm, "--batch-size", "4", "--max-new-tokens", "5"]
    run(small_store, *args)
    run(other, *args, "--executor", "ray", "--workers", "2")
    columns = ["sample_id", "caption", "tokens", "captioner", "prompt_id"]
    local, remote = (s.arrow("captions", columns).sort_by("sample_id") for s in (small_store, other))
    assert len(local) == 13 and remote.equals(local)
    assert rejects(other, "caption") == rejects(small_store, "caption") and len(rejects(other, "caption")) == 1


@pytest.mark.slow
def test_a_killed_ray_run_finishes_every_row_exactly_once(ray_cluster, tmp_path, tiny_vlm):
    # the killed command joins the test cluster: its actors die with it, the cluster lives on
    killed_caption_run_resumes_exactly_once(tmp_path, tiny_vlm, 60, "--executor", "ray", "--ray-address", ray_cluster,
                                            "--workers", "1")


@pytest.mark.slow
def test_without_an_address_a_command_starts_its_own_ray(ray_cluster, small_store):
    """The default path: a local Ray of its own, even with another Ray (the test cluster) running here."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "engine.cli", "--store", str(small_store.root), "embed", "--model",
                           "classical", "--modality", "image", "--executor", "ray", "--workers", "1", "--quiet"],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("13 image vectors from classical:")
    assert ray.get_runtime_context().gcs_address == ray_cluster  # this process stayed on its cluster


def test_the_cli_says_in_one_line_what_is_wrong(small_store):
    result = CliRunner().invoke(main, ["--store", str(small_store.root), "embed", "--model", "classical", "--modality",
                                       "image", "--executor", "ray", "--ray-address", "127.0.0.1:9"])
    assert result.exit_code == 2 and result.output.startswith("error: no Ray cluster answers at 127.0.0.1:9 (")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["--store", str(small_store.root), "embed", "--model", "classical", "--modality",
                                       "image", "--workers", "2"])
    assert result.exit_code == 2 and "--workers is for --executor ray" in result.output


def test_an_address_that_accepts_connections_but_is_no_gcs_fails_within_seconds(tmp_path):
    """A port that accepts TCP and says nothing (not a Ray GCS): the command fails in seconds, in one line
    naming the address, rather than after ray.init's minutes of retries."""
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "engine.cli", "--store", str(tmp_path / "store"), "ingest", "sample",
                               "--sample-dir", str(tmp_path / "sample"), "--executor", "ray", "--ray-address", address],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        took = time.perf_counter() - started
    assert done.returncode == 2 and took < 10
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines == [f"error: {address} accepts connections but is not a Ray cluster's GCS (no gRPC answer within 3 s); "
                     "give the head node's GCS port (6379 unless `ray start --head --port` said otherwise)"]
    assert not (tmp_path / "sample").exists()  # nothing ran


# -- ingest: a source's shards on Ray ------------------------------------------------------------------------------
def committed(store, table: str) -> pa.Table:
    """A table as committed, in commit order, without the run id (which differs between two runs)."""
    return store.arrow(table).drop_columns(["run_id"])


def test_ingest_of_the_sample_on_ray_commits_the_local_store(ray_cluster, tmp_path):
    from engine.ingest.sample import write_sample
    from engine.store import Store

    write_sample(tmp_path / "sample", scale=0.1)
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "remote")
    args = ["ingest", "sample", "--sample-dir", str(tmp_path / "sample"), "--batch-rows", "64"]
    out = run(local, *args)
    same = re.sub(r"\(run ingest-[^)]*\)", "", out)  # the summary, less the run id and the store
    assert re.sub(r"\(run ingest-[^)]*\)", "", run(remote, *args, "--executor", "ray", "--workers", "2")) == same
    assert out.startswith("380 rows written, 5 rejected, 0 already present")
    for table in ("samples", "rejects", "captions"):  # the same rows, in the same order (shard, then row)
        assert committed(remote, table).equals(committed(local, table)), table
    config = remote.arrow("runs").filter(pa.compute.equal(remote.arrow("runs")["stage"], "ingest"))["config"][0].as_py()
    assert '"executor": "ray"' in config and '"shards": 9' in config


def bad_rows_folder(root) -> None:
    """Two subsets, three files, rows that number on across a subset's files, and a bad row in each file."""
    good = png(10, 10)
    cauldron_parquet(root / "ai2d" / "train-00000-of-00002.parquet",
                     [([png(10, 10, (i, 9, 9))], qa(f"q{i}", f"a{i}")) for i in range(5)] + [([b"not an image"], qa("q", "a"))])
    cauldron_parquet(root / "ai2d" / "train-00001-of-00002.parquet",
                     [([good], qa("q6", "a6")), ([good], qa("q7", "")), ([good], qa("q8", "a8"))])
    cauldron_parquet(root / "chartqa" / "train-00000-of-00001.parquet",
                     [([b""], qa("q0", "a0"))] + [([png(12, 8, (0, i, 0))], qa(f"c{i}", f"b{i}")) for i in range(1, 7)])


def test_ingest_of_a_parquet_folder_with_bad_rows_on_ray_commits_the_local_store(ray_cluster, tmp_path):
    from engine.store import Store

    bad_rows_folder(tmp_path / "src")
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "remote")
    args = ["ingest", str(tmp_path / "src"), "--batch-rows", "3"]
    run(local, *args)
    out = run(remote, *args, "--executor", "ray", "--workers", "2")
    assert out.startswith("13 rows written, 3 rejected, 0 already present")
    for table in ("samples", "rejects"):
        assert committed(remote, table).equals(committed(local, table)), table
    assert remote.arrow("samples")["sample_id"].to_pylist() == [
        *(f"cauldron:ai2d:train:{i}" for i in (0, 1, 2, 3, 4, 6, 8)), *(f"cauldron:chartqa:train:{i}" for i in range(1, 7))]
    assert [(r["sample_id"], r["reason"]) for r in remote.arrow("rejects").to_pylist()] == [
        ("cauldron:ai2d:train:5", remote.arrow("rejects")["reason"][0].as_py()),
        ("cauldron:ai2d:train:7", "turn 0 has no answer"), ("cauldron:chartqa:train:0", "image 0: image is empty")]
    assert remote.arrow("rejects")["reason"][0].as_py().startswith("image 0: image cannot be decoded")
    again = run(remote, *args, "--executor", "ray", "--workers", "2")  # everything done: no shard is read again
    assert again.startswith("0 rows written, 0 rejected, 16 already present")


def test_row_group_shards_of_one_file_on_ray_commit_the_local_store(ray_cluster, tmp_path):
    """A file cut into shards of whole row groups (3 shards here) is read on several Ray tasks and committed
    as one local read of the file would be."""
    import pyarrow.parquet as pq

    from engine.ingest.cauldron import ParquetFolderSource
    from engine.stages.ingest import ingest
    from engine.store import Store

    class SmallShards(ParquetFolderSource):
        def shards(self, shard_rows: int = 4):
            return super().shards(shard_rows)

    path = cauldron_parquet(tmp_path / "src" / "ai2d" / "train-00000-of-00001.parquet",
                            [([png(10, 10, (i, 9, 9))], qa(f"q{i}", f"a{i}")) for i in range(9)] + [([b"bad"], qa("q", "a"))])
    pq.write_table(pq.read_table(path), path, row_group_size=4)
    assert len(SmallShards(tmp_path / "src").shards()) == 3
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "remote")
    ingest(local, SmallShards(tmp_path / "src"), batch_rows=3, progress=False)
    report = ingest(remote, SmallShards(tmp_path / "src"), batch_rows=3, progress=False, executor=RayExecutor(workers=2))
    assert (report.written, report.rejected) == (9, 1)
    for table in ("samples", "rejects"):
        assert committed(remote, table).equals(committed(local, table)), table


def test_a_source_error_in_a_ray_ingest_is_one_line(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    bad_rows_folder(tmp_path / "src")
    pq.write_table(pa.table({"texts": ["no images column"]}), tmp_path / "src" / "chartqa" / "train-00000-of-00001.parquet")
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "ingest", str(tmp_path / "src"), "--executor",
                                       "ray", "--workers", "2", "--quiet"])
    path = tmp_path / "src" / "chartqa" / "train-00000-of-00001.parquet"
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"error: {path}: not in the Cauldron schema, missing column(s) ['images']"


@pytest.mark.slow
def test_a_killed_ray_ingest_resumes_with_every_row_once(ray_cluster, tmp_path):
    from engine.store import Store

    files, rows = 4, 600
    for f in range(files):
        cauldron_parquet(tmp_path / "src" / "textvqa" / f"train-{f:05d}-of-{files:05d}.parquet",
                         [([png(6, 6, (i % 256, f, 0))], qa(f"question {f}.{i}", f"answer {i}")) for i in range(rows)])
    store_path = tmp_path / "store"
    command = [sys.executable, "-m", "engine.cli", "--store", str(store_path), "ingest", str(tmp_path / "src"),
               "--batch-rows", "8", "--quiet", "--executor", "ray", "--ray-address", ray_cluster, "--workers", "2"]
    kill_after_commits(command, store_path / "samples.lance", commits=5)
    partial = Store(store_path).table("samples").count_rows()
    assert 0 < partial < files * rows
    again = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"{files * rows - partial} rows written, 0 rejected, {partial} already present")
    ids = Store(store_path).arrow("samples", ["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == files * rows == len(set(ids))
