"""`facts` reads one run of each run-based table (interactions, corruption, gate): the newest finished
one or a pinned one, chosen by the same rule the MI gate uses (`engine.store.newest_run_sql`)."""

from __future__ import annotations

import datetime as dt

import duckdb
import pytest

from engine.interactions import gate
from engine.store import Store, attach


def score_run(store: Store, run_id: str, values: dict[str, float], finished: bool = True) -> None:
    """A score run's rows (sample_id -> u_v), then its `runs` row unless it was killed."""
    store.append("interactions", [{"sample_id": i, "run_id": run_id, "r": 0.0, "u_v": u, "u_t": 0.0, "s": 0.0}
                                  for i, u in values.items()])
    if finished:
        store.record_run(run_id, "score", {}, dt.datetime.now(dt.timezone.utc), len(values))


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(6)])
    score_run(store, "score-1", {f"x:{i}": 1.0 + i for i in range(6)})
    return store


def u_v(store: Store, pins: dict | None = None) -> dict[str, float | None]:
    con, _ = store.connect(pins)
    return dict(con.execute("select sample_id, u_v from facts order by 1").fetchall())


def test_facts_show_one_score_run_after_a_partial_rescoring(store):
    score_run(store, "score-2", {"x:4": 9.0, "x:5": 8.0})  # a second fit of two samples, on another scale
    # newest-per-sample would show 1..4 from score-1 beside 9, 8 from score-2: values of two fits ranked together
    assert u_v(store) == {"x:0": None, "x:1": None, "x:2": None, "x:3": None, "x:4": 9.0, "x:5": 8.0}
    assert u_v(store, {"interactions": {"run_id": "score-1"}}) == {f"x:{i}": 1.0 + i for i in range(6)}


def test_a_run_that_never_finished_is_not_read(store):
    score_run(store, "score-2", {"x:0": 50.0}, finished=False)  # killed: rows but no `runs` row
    assert u_v(store) == {f"x:{i}": 1.0 + i for i in range(6)}
    assert u_v(store, {"interactions": {"run_id": "score-2"}})["x:0"] == 50.0  # still readable when named


def test_a_table_without_finished_runs_reads_its_newest_run(tmp_path):
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": f"x:{i}", "source": "x", "subset": "s", "split": "train"} for i in range(3)])
    score_run(store, "score-1", {"x:0": 1.0, "x:1": 2.0, "x:2": 3.0}, finished=False)
    score_run(store, "score-2", {"x:1": 7.0}, finished=False)
    assert u_v(store) == {"x:0": None, "x:1": 7.0, "x:2": None}


def test_corruption_flags_come_from_one_run(store):
    store.append("corruption", [{"sample_id": f"x:{i}", "run_id": "corrupt-1", "corrupted": i < 3} for i in range(6)])
    store.record_run("corrupt-1", "corrupt", {}, dt.datetime.now(dt.timezone.utc), 6)
    store.append("corruption", [{"sample_id": "x:5", "run_id": "corrupt-2", "corrupted": True}])
    store.record_run("corrupt-2", "corrupt", {}, dt.datetime.now(dt.timezone.utc), 1)
    con, _ = store.connect()
    rows = con.execute("select sample_id, corrupted, corruption_run from facts where corrupted is not null").fetchall()
    assert rows == [("x:5", True, "corrupt-2")]


def test_the_gate_and_facts_choose_the_same_run(store):
    score_run(store, "score-2", {"x:4": 9.0, "x:5": 8.0})
    score_run(store, "score-3", {"x:0": 99.0}, finished=False)
    _, plan = gate(store, tau=0.5)
    con, _ = store.connect()
    assert plan.interactions_run == "score-2"
    assert con.execute("select count(*) from facts where u_v is not null").fetchone()[0] == plan.rows == 2


def test_a_mistyped_pin_fails_in_one_line(store):
    with pytest.raises(KeyError) as error:
        store.connect({"interactions": {"run_id": "score-9"}})
    message = str(error.value).strip('"')
    assert message == "facts.interactions: no rows with run_id = 'score-9'; its newest run_id values: ['score-1']"
    with pytest.raises(KeyError, match="facts.validation: no rows with model = 'nope'; its newest model values: none"):
        attach(duckdb.connect(), store.root, {"validation": {"model": "nope"}})
