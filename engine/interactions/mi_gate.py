"""The MI gate (Self-Captioning MI Tuning, Algorithm 2), once, in SQL: ``engine gate`` and a recipe's
``redundancy: {mode: mi_gate}`` both call :func:`decide`.

- **One fit.** The gate ranks the values of one score run: a named one, or the newest finished one (a
  run with its ``runs`` row). Newest-per-sample would mix two fits after a partial rescoring.
- **S_valid.** A row is eligible when u_v is positive, the largest of r, u_v, u_t (ties with r and u_t
  allowed) and strictly larger than s (a tie with synergy is left out). A row with a NaN, infinite or
  missing term is not eligible: DuckDB orders NaN above every number, so it would otherwise win.
- **k = min(floor(tau * N), |S_valid|)**, computed exactly (``gate_size``); N is the rows the gate
  considers (``basis: dataset``, Algorithm 2) or |S_valid| (``basis: valid``, the reference code).
- **Ranking.** u_v descending, then sample_id: the same rows on every run.
- **Adjustment.** ``adjust: rus`` ranks the reference estimator's RUS-adjusted values (``rus_constant``)
  instead of the raw ones; the store always keeps the raw values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import duckdb
import numpy as np

from engine.sql import sql_literal

BASES = ("dataset", "valid")
ADJUSTMENTS = ("none", "rus")
TERMS = ("r", "u_v", "u_t", "s")


def gate_size(tau, n: int) -> int:
    """floor(tau * n), exactly: tau is read as the decimal it was written as (0.29 * 100 = 29, where
    ``int(0.29 * 100)`` gives 28)."""
    try:
        fraction = tau if isinstance(tau, Fraction) else Fraction(str(tau))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"tau must be a number in [0, 1], got {tau!r}") from None
    if not 0 <= fraction <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return math.floor(fraction * n)


def rus_constant(means: dict[str, float]) -> float:
    """The reference estimator's global "RUS adjustment" constant c from the dataset means R, U_V, U_T, S.

    Adjusted terms are r + c, u_v - c, u_t - c, s + c, so R + U_V, R + U_T and the total are unchanged.
    When R or S is negative, c = -min(R, S) lifts both to >= 0 (U_V, U_T may go negative); else, when
    U_V or U_T is negative, c = min(U_V, U_T) lifts both to >= 0; else c = 0.
    """
    r, u_v, u_t, s = (means[name] for name in TERMS)
    if r < 0 or s < 0:
        return -min(r, s)
    if u_v < 0 or u_t < 0:
        return min(u_v, u_t)
    return 0.0


def adjusted(means: dict[str, float], constant: float) -> dict[str, float]:
    """R, U_V, U_T, S after adding ``constant`` to r and s and subtracting it from u_v and u_t."""
    sign = {"r": 1.0, "u_v": -1.0, "u_t": -1.0, "s": 1.0}
    return {name: means[name] + sign[name] * constant for name in TERMS}


def _finite(prefix: str = "") -> str:
    return " and ".join(f"isfinite({prefix}{name})" for name in TERMS)


def term_means(terms: dict) -> dict[str, float]:
    """R, U_V, U_T, S: means of r, u_v, u_t, s over the rows whose four terms are finite, summed exactly
    (``math.fsum``) so the RUS constant does not depend on row order or threads."""
    stacked = np.stack([np.asarray(terms[name], dtype=np.float64) for name in TERMS])
    keep = np.isfinite(stacked).all(axis=0)
    if not keep.any():
        raise LookupError("no rows with finite r, u_v, u_t, s")
    return {name: math.fsum(row[keep]) / int(keep.sum()) for name, row in zip(TERMS, stacked)}


def run_means(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, float]:
    """R, U_V, U_T, S over all rows of a score run (the set the run's RUS constant is computed on)."""
    table = con.sql(f"select {', '.join(TERMS)} from interactions where run_id = ?", params=[run_id]).to_arrow_table()
    return term_means({name: table.column(name).to_numpy(zero_copy_only=False) for name in TERMS})


def rus_figures(terms: dict, folds) -> dict:
    """Dataset figures raw and RUS-adjusted: over all rows (``all``, the constant the gate uses) and per
    fold (each with its own constant, as the reference estimator averages one split at a time)."""
    folds = np.asarray(folds)
    groups = {"all": np.ones(len(folds), bool), **{f: folds == f for f in ("train", "val", "test") if (folds == f).any()}}
    figures = {}
    for name, mask in groups.items():
        try:
            raw = term_means({t: np.asarray(terms[t])[mask] for t in TERMS})
        except LookupError:
            continue
        constant = rus_constant(raw)
        figures[name] = {"raw": raw, "constant": constant, "rus": adjusted(raw, constant)}
    return figures


def score_runs(con: duckdb.DuckDBPyConnection) -> list[tuple[str, dict]]:
    """Finished score runs, newest first, with their recorded configuration."""
    rows = con.execute(
        "select run_id, config from runs where stage = 'score' and run_id in (select distinct run_id from interactions) "
        "order by run_id desc"
    ).fetchall()
    return [(run_id, json.loads(config or "{}")) for run_id, config in rows]


def resolve_run(con: duckdb.DuckDBPyConnection, run_id: str | None) -> tuple[str, dict]:
    """The score run a gate reads, and its recorded configuration (empty when it has no ``runs`` row).

    Raises
    ------
    LookupError
        No finished score run, or the named run scored nothing.
    """
    if run_id is None:
        from engine.store import newest_run_sql

        run_id = con.execute(f"select {newest_run_sql('interactions', finished_only=True)}").fetchone()[0]
        if run_id is None:
            raise LookupError("no finished score run in the store; run `engine score` first")
    if not con.execute("select count(*) from interactions where run_id = ?", [run_id]).fetchall()[0][0]:
        known = [r for (r,) in con.execute("select distinct run_id from interactions order by 1 desc limit 5").fetchall()]
        raise LookupError(f"interactions run {run_id!r} scored nothing; newest runs: {known or 'none'}")
    config = dict(score_runs(con)).get(run_id, {})
    return run_id, config


@dataclass
class GatePlan:
    """What the gate decided over, for a run record or a manifest."""

    rows: int  # N: the rows the gate considered
    scored: int  # of those, rows the score run has values for
    valid: int  # |S_valid|
    k: int
    interactions_run: str
    adjust: str
    adjust_constant: float  # c added to r and s (0.0 with adjust none)

    def record(self) -> dict:
        return asdict(self)


def decide(con: duckdb.DuckDBPyConnection, population: str, tau, basis: str = "dataset",
           interactions_run: str | None = None, adjust: str | None = None) -> GatePlan:
    """Create temp table ``gate_decision(sample_id, gate_valid, gate_rank, gate_selected)`` with one row per
    row of ``population`` (SQL yielding distinct ``sample_id``s: the gate's N).

    Parameters
    ----------
    basis
        ``dataset``: N is the population's size (Algorithm 2); ``valid``: N is |S_valid| (reference code).
    interactions_run
        The score run whose values are ranked (default: the newest finished one).
    adjust
        ``none`` (raw values) or ``rus`` (the reference's RUS-adjusted values, constant over the whole run);
        default: the choice the score run recorded, else ``none``.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    gate_size(tau, 0)  # checks tau's range before any work
    run_id, config = resolve_run(con, interactions_run)
    adjust = adjust or config.get("adjust") or "none"
    if adjust not in ADJUSTMENTS:
        raise ValueError(f"adjust must be one of {ADJUSTMENTS}, got {adjust!r}")
    constant = rus_constant(run_means(con, run_id)) if adjust == "rus" else 0.0
    c = f"CAST('{float(constant)!r}' AS DOUBLE)"  # the exact double, whatever its repr looks like
    con.execute(
        f"""create or replace temp table gate_values as
        select p.sample_id, i.run_id is not null as scored, i.u_v - {c} as value,
               coalesce({_finite('i.')} and i.u_v - {c} > 0 and i.u_v - {c} > i.s + {c}
                        and i.u_v - {c} >= i.r + {c} and i.u_v >= i.u_t, false) as gate_valid
        from (select distinct sample_id from ({population})) p
        left join (select * from interactions where run_id = {sql_literal(run_id)}) i using (sample_id)"""
    )
    rows, scored, valid = con.execute("select count(*), count_if(scored), count_if(gate_valid) from gate_values").fetchall()[0]
    k = min(gate_size(tau, rows if basis == "dataset" else valid), valid)
    con.execute(
        f"""create or replace temp table gate_decision as
        select sample_id, gate_valid, gate_rank, coalesce(gate_rank <= {k}, false) as gate_selected
        from (select sample_id, gate_valid,
                     case when gate_valid then row_number() over (partition by gate_valid order by value desc, sample_id) end
                         as gate_rank
              from gate_values)"""
    )
    return GatePlan(rows=rows, scored=scored, valid=valid, k=k, interactions_run=run_id, adjust=adjust,
                    adjust_constant=float(constant))
