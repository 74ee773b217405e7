"""The stage mechanism: one runner (selection, anti-join resume, commits, rejects, runs) for every stage."""

import json
import pickle
import re
import shutil

import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import REPO
from engine.cli import main
from engine.models.backends import Backend, BackendSpec, Generation, PromptTooLong, run_fitting
from engine.stages.base import load_batch, run_stage, select
from engine.stages.caption import CaptionStage
from engine.stages.corrupt import corrupt
from engine.stages.embed import embed
from engine.stages.executors.local import LocalExecutor
from engine.stages.image_stats import ImageStats
from engine.store import Store

SUBSET = "subset = 'bar_charts'"


def readme_blocks(after: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(after):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


class Crash(RuntimeError):
    pass


class CrashingExecutor(LocalExecutor):
    """The local executor, stopped dead after ``batches`` outputs (as a kill would stop it)."""

    def __init__(self, batches: int):
        self.batches = batches

    def run(self, stage, selection, reader, batch_rows):
        for index, output in enumerate(super().run(stage, selection, reader, batch_rows)):
            if index == self.batches:
                raise Crash("killed")
            yield output


def ids_of(store: Store, table: str, **where) -> list[str]:
    rows = store.arrow(table).to_pylist()
    return sorted(r["sample_id"] for r in rows if all(r[k] == v for k, v in where.items()))


def test_the_readme_stage_is_the_shipped_one_and_runs_verbatim(sample_store_template, tmp_path, monkeypatch):
    stage_code, run_code = readme_blocks("## Adding a stage")
    assert stage_code in (REPO / "engine" / "stages" / "image_stats.py").read_text()  # the README shows the real class
    shutil.copytree(sample_store_template, tmp_path / "data" / "store")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(stage_code + run_code, "README.md", "exec"), namespace)
    report, store = namespace["report"], Store(tmp_path / "data" / "store")
    con, _ = store.connect()
    train = con.execute("select count(*) from samples where split = 'train'").fetchall()[0][0]
    assert (report.written, report.rejected) == (train, 0) and train > 0
    stats = con.execute("select min(brightness), max(brightness), min(contrast) from facts where brightness is not null").fetchall()[0]
    assert 0 <= stats[0] < stats[1] <= 1 and stats[2] >= 0
    runs = store.arrow("runs", filter=f"run_id = '{report.run_id}'").to_pylist()
    assert runs[0]["stage"] == "image-stats" and runs[0]["rows"] == train
    again = run_stage(store, namespace["ImageStats"](), where="split = 'train'", progress=False)
    assert (again.selected, again.written) == (0, 0)  # all done: the anti-join leaves nothing


def test_a_stage_killed_halfway_resumes_with_every_row_once(sample_store):
    wanted = ids_of(sample_store, "samples", subset="bar_charts")
    with pytest.raises(Crash):
        run_stage(sample_store, ImageStats(), SUBSET, executor=CrashingExecutor(batches=2), batch_rows=4, commit_rows=4,
                  progress=False)
    committed = ids_of(sample_store, "image_stats")
    assert committed == wanted[:8]  # two batches of 4 committed, in selection order; no run recorded
    assert not sample_store.arrow("runs", filter="stage = 'image-stats'").num_rows
    report = run_stage(sample_store, ImageStats(), SUBSET, batch_rows=4, commit_rows=4, progress=False)
    assert report.selected == len(wanted) - 8 and report.written == len(wanted) - 8
    assert ids_of(sample_store, "image_stats") == wanted  # every row once


def test_selection_is_an_anti_join_on_the_stage_key_and_configuration(sample_store, tmp_path):
    spec = BackendSpec(str(tmp_path / "no-model"))
    stage = CaptionStage(spec)
    first = sorted(ids_of(sample_store, "samples", subset="bar_charts"))[:3]
    sample_store.append("captions", [{"sample_id": sid, "captioner": spec.name, "prompt_id": stage.prompt_id, "caption": "x"}
                                     for sid in first[:2]] +
                        [{"sample_id": first[2], "captioner": "another", "prompt_id": stage.prompt_id, "caption": "x"}])
    selection, reader, skipped, _ = select(sample_store, stage, SUBSET)
    chosen = selection.column("sample_id").to_pylist()
    assert first[0] not in chosen and first[1] not in chosen and first[2] in chosen  # another captioner's row is not done
    assert chosen == sorted(chosen) and set(selection.column_names) == {"sample_id", "pos", "subset"} and skipped == 0
    # a reader and a stage travel to another process: Lance is opened there, the model loaded there
    reader = pickle.loads(pickle.dumps(reader))
    batch = load_batch(selection.slice(0, 2), reader)
    assert batch.column_names[-1] == "images" and batch.num_rows == 2
    assert pickle.loads(pickle.dumps(stage)).spec == spec


def broken_store(sample_store: Store) -> str:
    """The sample store plus a sample whose image bytes do not decode (ingest would have refused it)."""
    row = sample_store.arrow("samples", filter=SUBSET).slice(0, 1).to_pylist()[0]
    row.update(sample_id="sample:bar_charts:train:broken", row=10**6, images=[b"not an image"])
    sample_store.append("samples", [row])
    return row["sample_id"]


def test_embed_rejects_a_broken_image_once_and_skips_it_after(sample_store):
    broken = broken_store(sample_store)
    report = embed(sample_store, "classical", "image", where=SUBSET, progress=False)
    n = len(ids_of(sample_store, "samples", subset="bar_charts"))
    assert (report.written, report.rejected) == (n - 1, 1) and report.reasons == {"image cannot be decoded": 1}
    rejects = sample_store.arrow("rejects", filter="stage = 'embed'").to_pylist()
    assert [(r["sample_id"], r["reason"]) for r in rejects] == [(broken, "image cannot be decoded (UnidentifiedImageError)")]
    again = embed(sample_store, "classical", "image", where=SUBSET, progress=False)
    assert (again.written, again.rejected, again.skipped_rejected) == (0, 0, 1)  # a permanent reason: not tried again
    assert sample_store.arrow("rejects", filter="stage = 'embed'").num_rows == 1


class Rewriter(Backend):
    """A stand-in rewrite model: answers "not <answer>" and can die after some calls."""

    name = "rewriter"

    def __init__(self, die_after: int | None = None):
        self.calls, self.die_after = 0, die_after

    def generate(self, requests, max_new_tokens=96, min_new_tokens=0):
        if self.die_after is not None and self.calls == self.die_after:
            raise Crash("killed")
        self.calls += 1
        return [Generation("not " + r.text.rsplit("Answer: ", 1)[-1][:20], 3) for r in requests]

    def score(self, requests, targets):
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        return 4096


def test_corrupt_commits_as_it_goes_and_a_killed_run_resumes_under_its_id(sample_store):
    where = "subset in ('bar_charts', 'word_math')"
    n = len([r for r in sample_store.arrow("samples", ["subset"]).to_pylist() if r["subset"] in ("bar_charts", "word_math")])
    with pytest.raises(Crash):
        corrupt(sample_store, 1.0, where, seed=1, backend=Rewriter(die_after=3), batch_size=4, commit_rows=4, progress=False)
    partial = sample_store.arrow("corruption").to_pylist()
    (killed,) = {r["run_id"] for r in partial}
    assert 0 < len(partial) < n and not sample_store.arrow("runs", filter="stage = 'corrupt'").num_rows
    run_id, counts = corrupt(sample_store, 1.0, where, seed=1, backend=Rewriter(), batch_size=4, commit_rows=4, progress=False)
    flags = sample_store.arrow("corruption").to_pylist()
    assert run_id == killed and counts["rows"] == len(flags) == n  # one run, every row flagged once
    assert len({r["sample_id"] for r in flags}) == n
    (record,) = sample_store.arrow("runs", filter="stage = 'corrupt'").to_pylist()
    assert record["rows"] == n and json.loads(record["config"])["rewrite_model"] == "rewriter"
    other, _ = corrupt(sample_store, 1.0, where, seed=2, progress=False)  # another configuration: a new run
    assert other != run_id


def test_over_long_prompts_follow_one_rule():
    def call(items):
        long = {i: 100 + item for i, item in enumerate(items) if item > 5}
        if long:
            raise PromptTooLong(long, 50)
        return [item * 10 for item in items]

    results, kept, dropped = run_fitting(call, [1, 7, 2, 9])
    assert (results, kept) == ([10, 20], [0, 2])
    assert dropped == {1: "prompt needs 107 tokens, more than the model context of 50",
                       3: "prompt needs 109 tokens, more than the model context of 50"}
    assert run_fitting(call, [8]) == ([], [], {0: "prompt needs 108 tokens, more than the model context of 50"})


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["embed", "--modality", "image", "--model", "classical"],
    ["image-stats"],
    ["score", "--image-model", "classical", "--text-model", "x"],
    ["gate", "--tau", "0.5"],
    ["caption", "--model", "{model}"],
    ["validate", "--model", "{model}"],
    ["corrupt", "--fraction", "0.5"],
    ["facts", "--model", "{model}"],
    ["eval", "--model", "{model}", "--out", "{tmp}/ev"],
    ["attribute", "--model", "{model}"],
])
def test_a_where_that_names_no_column_is_one_line_for_every_command(sample_store, tiny_vlm, tmp_path, command):
    args = [a.format(model=tiny_vlm, tmp=tmp_path) for a in command]
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), *args, "--where", "no_such_column = 1"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --where: invalid SQL: Binder Error") and result.output.count("\n") == 1


def test_a_where_that_names_no_column_is_one_line(sample_store):
    result = CliRunner().invoke(main, ["--store", str(sample_store.root), "corrupt", "--fraction", "0.5",
                                       "--where", "no_such_column = 1"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --where: invalid SQL: Binder Error") and result.output.count("\n") == 1
    assert not sample_store.arrow("corruption").num_rows
