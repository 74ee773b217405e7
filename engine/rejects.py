"""Rejects once: the rule, shared by ingest and the model-driven stages, for writing the ``rejects`` table.

- A row is written once per (sample, stage, reason): ``rejects`` declares that key ``unique`` in
  ``schemas/store.yaml``, so ``Store.append`` drops a repeat under the store's write lock; a rerun that meets
  the same problem again counts it in its report but does not append the same row again. A different reason (say, the same prompt against a
  model with a shorter context) is a new row.
- Some reasons are **permanent**: no rerun can change them, because what they are about never changes.
  ``samples`` is never rewritten, so an image a stage could not decode will not decode on the next run,
  with any model. Model stages skip rows rejected for such a reason (by any model stage) instead of
  decoding them again. Every other reason, such as a prompt longer than a model's context, depends on the
  model or the prompt template, so those rows are tried again on every run (and not written twice).
- Ingest skips every id it has rejected before: what it read from the source is the row, and a row that
  was rejected stays rejected until it is re-ingested under another source name.
"""

from __future__ import annotations

from engine.sql import sql_literal
from engine.store import Store

# Reasons (by how they start) that a rerun cannot change; see the module docstring.
PERMANENT_REASONS = ("image cannot be decoded",)


def permanent_sql() -> str:
    """Filter (Lance or DuckDB SQL over ``rejects``) for rows rejected by a model stage for a permanent reason."""
    reasons = " OR ".join(f"reason LIKE {sql_literal(prefix + '%')}" for prefix in PERMANENT_REASONS)
    return f"stage != 'ingest' AND ({reasons})"


def permanently_rejected(store: Store) -> set[str]:
    """Ids of the samples a model stage rejected for a reason no rerun can change."""
    return store.ids("rejects", permanent_sql())
