"""``engine corrupt``: for experiments, replace a fraction of a split's answers with wrong ones, keeping the
original ("Corrupted but Not Broken", §3). Which rows, and what they become, is decided by salted SHA-256,
so the same seed gives the same corruption:

- a class answer (the row has a ``label``) swaps to another label of its subset (``option_swap``);
- a multiple-choice letter swaps to another letter the question offers (``option_swap``);
- a free-form answer swaps to another answer drawn from the same subset (``pool_swap``), or, with a
  rewrite model, is rewritten by it into a plausible but incorrect answer (``model_rewrite``).

Every row of the selection gets a flag (corrupted or not), in one commit.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from tqdm.auto import tqdm

from engine.generate.backends import Backend, Request, decode_images
from engine.generate.stage import prompts
from engine.hashing import hash_u64, tier_threshold
from engine.options import alternatives, offered_letters  # noqa: F401 (offered_letters: re-exported for engine eval)
from engine.store import Store, new_run_id

def _pick(options: list[str], salt: str, sample_id: str) -> str:
    return options[hash_u64(salt, sample_id) % len(options)]


def corrupt(store: Store, fraction: float, where: str | None = "split = 'train'", seed: int = 0,
            backend: Backend | None = None, batch_size: int = 8, progress: bool = True) -> tuple[str, dict[str, int]]:
    """Flag and corrupt ``fraction`` of the rows matching ``where``; returns the run id and counts per kind."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    run_id, started = new_run_id("corrupt"), dt.datetime.now(dt.timezone.utc)
    con, _ = store.connect()
    rows = con.sql(
        f"""select sample_id, subset, label, turns[1].user as question, turns[1].assistant as answer
        from samples where {where or 'true'} order by sample_id"""
    ).to_arrow_table().to_pylist()
    if not rows:
        raise LookupError(f"no samples match {where!r}")
    labels: dict[str, set] = {}
    answers: dict[str, set] = {}
    for row in rows:
        if row["label"] is not None:
            labels.setdefault(row["subset"], set()).add(row["label"])
        answers.setdefault(row["subset"], set()).add(row["answer"])
    threshold = tier_threshold(fraction)
    flags, rewrite = [], []
    for row in rows:
        flag = {"sample_id": row["sample_id"], "run_id": run_id, "corrupted": False, "kind": None,
                "original": row["answer"], "replaced": None}
        flags.append(flag)
        if hash_u64(f"corrupt:{seed}:", row["sample_id"]) >= threshold:
            continue
        salt = f"corrupt-pick:{seed}:"
        kind, others = alternatives(row["question"], row["answer"], row["label"], labels.get(row["subset"], ()),
                                    answers[row["subset"]])
        if kind in ("option", "label"):
            flag.update(corrupted=True, kind="option_swap", replaced=_pick(others, salt, row["sample_id"]))
        elif backend is not None:
            rewrite.append((flag, row))
        elif others:
            flag.update(corrupted=True, kind="pool_swap", replaced=_pick(others, salt, row["sample_id"]))
    if rewrite:
        template = prompts()["corruption"]["rewrite"]
        images = {r["sample_id"]: r["images"] for r in con.sql(
            "select sample_id, images from samples where sample_id in (select unnest(?))", params=[[r["sample_id"] for _, r in rewrite]]
        ).to_arrow_table().to_pylist()}
        for start in tqdm(range(0, len(rewrite), batch_size), desc=f"rewrite ({backend.name})", disable=not progress):
            chunk = rewrite[start : start + batch_size]
            requests = [Request(decode_images(images[row["sample_id"]]), template.format(question=row["question"], answer=row["answer"]))
                        for _, row in chunk]
            for (flag, row), generation in zip(chunk, backend.generate(requests, max_new_tokens=64)):
                if generation.text and generation.text.strip() != row["answer"].strip():
                    flag.update(corrupted=True, kind="model_rewrite", replaced=generation.text)
    store.append("corruption", pa.Table.from_pylist(flags))
    counts = {"rows": len(flags), "corrupted": sum(f["corrupted"] for f in flags)}
    for flag in flags:
        if flag["kind"]:
            counts[flag["kind"]] = counts.get(flag["kind"], 0) + 1
    store.record_run(run_id, "corrupt", {"fraction": fraction, "where": where, "seed": seed,
                                         "rewrite_model": backend.name if backend else None, **counts}, started, len(flags))
    return run_id, counts
