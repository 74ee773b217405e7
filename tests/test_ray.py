"""``--executor ray``: the same stages on a Ray cluster give the same rows as the local executor, resume
exactly once after a kill, spread over nodes, and fail with one clear line.

One Ray cluster serves the whole module: two simulated nodes of one CPU each (``ray.cluster_utils.Cluster``),
so every Ray test here also runs across nodes. Skipped when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import os
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
from conftest import REPO, killed_caption_run_resumes_exactly_once  # noqa: E402
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
