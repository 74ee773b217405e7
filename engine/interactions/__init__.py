"""Multimodal interactions: pointwise r, u_v, u_t, s per sample (``engine score``) and the MI gate
(``engine gate``)."""

from __future__ import annotations

import datetime as dt
import math
import time

import numpy as np
import pyarrow as pa

from engine.stages.embed import load_vectors
from engine.interactions.estimator import LSMIConfig, LSMIResult, estimate
from engine.interactions.mi_gate import ADJUSTMENTS, GatePlan, decide, resolve_run, rus_figures
from engine.interactions.pid import decompose, exact_pid
from engine.hashing import hash_u64
from engine.sql import sql_literal
from engine.stages.base import WholeStage, check_where, write_run
from engine.store import Store, new_run_id

__all__ = ["GatePlan", "LSMIConfig", "LSMIResult", "assign_folds", "decompose", "estimate", "exact_pid", "gate", "score"]


def assign_folds(sample_ids: list[str], splits: list[str], val_fraction: float = 0.1) -> np.ndarray:
    """Estimator folds: a sample's own test / validation split is kept; train rows go to ``val`` when
    the salted hash of their id falls under ``val_fraction`` (deterministic), else ``train``."""
    threshold = math.ceil(val_fraction * 2**64)
    folds = []
    for sample_id, split in zip(sample_ids, splits):
        if split == "test":
            folds.append("test")
        elif split in ("validation", "val"):
            folds.append("val")
        else:
            folds.append("val" if hash_u64("fold:", sample_id) < threshold else "train")
    return np.array(folds)


def score(store: Store, image_model: str, text_model: str, where: str | None = None,
          config: LSMIConfig | None = None, progress: bool = True, adjust: str = "none") -> tuple[str, LSMIResult]:
    """Run the LSMI estimator on every labelled sample matching ``where`` that has both embeddings and
    write the ``interactions`` table. Returns the run id and the result.

    The table always holds the raw pointwise values. ``adjust`` (``none`` or ``rus``) is the run's recorded
    choice of the values a gate ranks by default; ``result.info["rus"]`` holds the dataset figures raw and
    RUS-adjusted either way (``engine.interactions.mi_gate.rus_figures``).
    """
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"adjust must be one of {ADJUSTMENTS}, got {adjust!r}")
    config = config or LSMIConfig()
    run_id, started, clock = new_run_id("score"), dt.datetime.now(dt.timezone.utc), time.perf_counter()
    con, versions = store.connect()
    check_where(con, where)
    rows = con.execute(
        f"select sample_id, label, split from facts where label is not null and ({where or 'true'}) order by sample_id"
    ).fetchall()
    if not rows:
        raise LookupError("no labelled samples match; the estimator needs a discrete `label` (e.g. `engine ingest easy_vqa`)")
    wanted = [r[0] for r in rows]
    image_ids, x_v = load_vectors(store, image_model, "image", wanted)
    text_ids, x_t = load_vectors(store, text_model, "text", wanted)
    common = sorted(set(image_ids) & set(text_ids))
    if len(common) < len(wanted):
        raise LookupError(f"{len(wanted) - len(common)} of {len(wanted)} samples lack an image or text embedding; run `engine embed` first")
    info = {r[0]: (r[1], r[2]) for r in rows}
    labels = np.array([info[i][0] for i in common])
    folds = assign_folds(common, [info[i][1] for i in common])
    result = estimate(x_v, x_t, labels, folds, config, progress)
    result.info["rus"] = rus_figures(result.pointwise, folds)
    table = {"sample_id": common, "fold": folds.tolist(),
             **{name: result.pointwise[name] for name in ("r", "u_v", "u_t", "s", "i_v", "i_t", "i_vt", "h_v", "h_t")},
             "dominant": result.dominant.tolist()}
    config_record = {"image_model": image_model, "text_model": text_model, "where": where, "units": "nats", "adjust": adjust,
                     "prior": "label frequency in the train fold", "store_versions": versions, **result.info}
    write_run(store, WholeStage("score", "interactions", config_record), pa.table(table), run_id, started, clock)
    return run_id, result


GATE_WHERE = "split = 'train'"


def gate(store: Store, tau, basis: str = "dataset", where: str | None = GATE_WHERE,
         interactions_run: str | None = None, adjust: str | None = None) -> tuple[str, GatePlan]:
    """The MI gate (Algorithm 2, see ``engine.interactions.mi_gate``) over the samples of one score run that
    match ``where`` (default: the train split, the rows a mixture is built from). Writes the ``gate``
    table and returns the gate run id and its plan (N, |S_valid|, k, the score run, the adjustment)."""
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    con, versions = store.connect()
    try:
        check_where(con, where)
        population = f"select sample_id from facts where ({where or 'true'})"
        # the population is the chosen run's samples that match `where`: resolve the run first
        run, _ = resolve_run(con, interactions_run)
        plan = decide(con, f"select sample_id from interactions where run_id = {sql_literal(run)} and sample_id in ({population})",
                      tau, basis, run, adjust)
        if not plan.rows:
            raise LookupError(f"no sample of score run {run} matches {where!r}")
        decision = con.sql("select * from gate_decision order by sample_id").to_arrow_table()
    finally:
        con.close()
    run_id = new_run_id("gate")
    rows = pa.table({
        "sample_id": decision.column("sample_id"),
        "gate_interactions_run": [run] * len(decision), "gate_valid": decision.column("gate_valid"),
        "gate_rank": decision.column("gate_rank").cast(pa.int64()), "gate_selected": decision.column("gate_selected"),
    })
    config = {"tau": tau, "basis": basis, "where": where, "store_versions": versions, **plan.record()}
    write_run(store, WholeStage("gate", "gate", config), rows, run_id, started, clock)
    return run_id, plan
