"""Multimodal interactions: pointwise r, u_v, u_t, s per sample (``engine score``) and the MI gate
(``engine gate``)."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa

from engine.embed import load_vectors
from engine.interactions.estimator import LSMIConfig, LSMIResult, estimate
from engine.interactions.pid import decompose, exact_pid
from engine.hashing import hash_u64
from engine.sql import sql_literal
from engine.store import Store, new_run_id

__all__ = ["LSMIConfig", "LSMIResult", "assign_folds", "decompose", "estimate", "exact_pid", "gate", "score"]


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
          config: LSMIConfig | None = None, progress: bool = True) -> tuple[str, LSMIResult]:
    """Run the LSMI estimator on every labelled sample matching ``where`` that has both embeddings and
    write the ``interactions`` table. Returns the run id and the result."""
    config = config or LSMIConfig()
    run_id, started = new_run_id("score"), dt.datetime.now(dt.timezone.utc)
    con, versions = store.connect()
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
    table = {"sample_id": common, "run_id": [run_id] * len(common), "fold": folds.tolist(),
             **{name: result.pointwise[name] for name in ("r", "u_v", "u_t", "s", "i_v", "i_t", "i_vt", "h_v", "h_t")},
             "dominant": result.dominant.tolist()}
    store.append("interactions", pa.table(table))
    config_record = {"image_model": image_model, "text_model": text_model, "where": where, "units": "nats",
                     "prior": "label frequency in the train fold", "store_versions": versions, **result.info}
    store.record_run(run_id, "score", config_record, started, len(common))
    return run_id, result


def gate(store: Store, tau: float, basis: str = "dataset", where: str | None = None, interactions_run: str | None = None) -> tuple[str, int]:
    """The MI gate (Algorithm 2) over the scored samples matching ``where``: S_valid = samples whose largest
    interaction is u_v (never synergy-dominant, ties with s excluded); select the k = min(floor(tau * N),
    |S_valid|) with the highest u_v (N = the scored samples, or |S_valid| with ``basis="valid"``).
    Writes the ``gate`` table; returns the run id and k."""
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    con, _ = store.connect()
    pin = f"where run_id = {sql_literal(interactions_run)}" if interactions_run else ""
    rows = con.execute(
        f"""with latest as (select * from interactions {pin}
                            qualify row_number() over (partition by sample_id order by run_id desc) = 1)
            select l.sample_id, l.u_v, coalesce(l.u_v > l.s and l.u_v >= l.r and l.u_v >= l.u_t, false), l.run_id
            from latest l join facts f using (sample_id) where ({where or 'true'}) order by l.sample_id"""
    ).fetchall()
    if not rows:
        raise LookupError("no scored samples match; run `engine score` first")
    valid = [r for r in rows if r[2]]
    k = min(int(tau * (len(rows) if basis == "dataset" else len(valid))), len(valid))
    ranked = sorted(valid, key=lambda r: (-r[1], hash_u64("gate:", r[0])))
    rank = {r[0]: i + 1 for i, r in enumerate(ranked)}
    run_id, started = new_run_id("gate"), dt.datetime.now(dt.timezone.utc)
    store.append("gate", pa.table({
        "sample_id": [r[0] for r in rows], "run_id": [run_id] * len(rows), "gate_interactions_run": [r[3] for r in rows],
        "gate_valid": [r[2] for r in rows], "gate_rank": pa.array([rank.get(r[0]) for r in rows], pa.int64()),
        "gate_selected": [rank.get(r[0], k + 1) <= k for r in rows],
    }))
    store.record_run(run_id, "gate", {"tau": tau, "basis": basis, "where": where, "interactions_run": interactions_run,
                                      "scored": len(rows), "valid": len(valid), "k": k}, started, len(rows))
    return run_id, k
