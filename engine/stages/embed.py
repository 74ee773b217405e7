"""``engine embed``: frozen, L2-normalised image or text embeddings of the store's samples (the encoders
are in ``engine.models.encoders``).

The text of a sample is its first user turn. Vectors go to ``embeddings``, one Lance table per (modality,
model) so that each holds fixed-size vectors of one space (LanceDB searches and indexes them), in
committed batches; a run started again skips the ids already embedded, and an image that does not decode
becomes one reject. ``--pca K`` then fits a PCA on the train split (optionally standardising each
dimension) and stores the transformed vectors as model ``{model}|pca{K}`` (``|std`` appended when
standardised). A fit rewrites every vector of that model in one commit, each row carrying the fit's run
id, saves the transform as ``transforms/{table}/{run_id}.npz`` and is recorded in ``runs``: the vectors
in the store and the transform that made them always match (a refit after more samples were embedded
re-projects the old rows too, rather than leaving them in the previous fit's space).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.models.encoders import Encoder, EmbeddingCache, encoder_spec, load_encoder
from engine.sql import sql_literal
from engine.stages.base import Needs, Stage, StageOutput, StageReport, check_where, reject, run_stage
from engine.store import Store, new_run_id, partition_table_name


class EmbedStage(Stage):
    """One vector per sample for one (model, modality); a broken image is rejected, not fatal."""

    name = "embed"
    table = "embeddings"
    skip_permanent_rejects = True

    def __init__(self, model: str, modality: str, device: str = "cpu", batch_rows: int = 64,
                 encoder: Encoder | None = None):
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be image or text, not {modality!r}")
        self.model, self.modality, self.device, self.batch_rows = model, modality, device, batch_rows
        self.encoder = encoder
        self.encoder_name, modalities = (encoder.name, encoder.modalities) if encoder else encoder_spec(model)
        if modality not in modalities:
            raise ValueError(f"{self.encoder_name} embeds {', '.join(modalities)}, not {modality}")
        self.reads = ("images",) if modality == "image" else ("turns",)
        self.needs = Needs(device="gpu" if device.startswith("cuda") else "cpu", gpus=1.0 if device.startswith("cuda") else 0.0,
                           model=self.encoder_name)
        self.cache = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "encoder": None, "cache": None}  # each worker loads its own

    def config(self) -> dict:
        return {"model": self.encoder_name, "modality": self.modality, "batch_size": self.batch_rows}

    def done_filter(self) -> str:
        return f"model = {sql_literal(self.encoder_name)} and modality = {sql_literal(self.modality)}"

    def setup(self) -> None:
        if self.encoder is None:
            self.encoder = load_encoder(self.model, self.device)
        if self.cache is None:
            self.cache = EmbeddingCache(self.encoder, self.modality)

    def process(self, batch: pa.Table) -> StageOutput:
        ids = batch.column("sample_id").to_pylist()
        values = batch.column(self.reads[0]).to_pylist()
        items = [(v[0] if v else None) if self.modality == "image" else (v[0]["user"] if v else "") for v in values]
        try:
            vectors, kept, rejects = self.cache.encode(items), ids, []
        except Exception:  # some item does not decode: find which, one at a time, and reject only those
            kept, good, rejects = [], [], []
            for sample_id, item in zip(ids, items):
                try:
                    self.cache.encode([item])
                except MemoryError:
                    raise
                except Exception as error:
                    what = "image cannot be decoded" if self.modality == "image" else "text cannot be encoded"
                    rejects.append(reject(sample_id, f"{what} ({type(error).__name__})"))
                    continue
                kept.append(sample_id)
                good.append(item)
            vectors = self.cache.encode(good) if good else None
        if not kept:
            return StageOutput(None, rejects)
        return StageOutput(pa.table({
            "sample_id": pa.array(kept, pa.string()),
            "model": pa.array([self.encoder_name] * len(kept), pa.string()),
            "modality": pa.array([self.modality] * len(kept), pa.string()),
            "vector": _vectors(vectors),
        }), rejects)


def embed(store: Store, model: str, modality: str, where: str | None = None, batch_size: int = 64,
          device: str = "cpu", progress: bool = True, encoder: Encoder | None = None, executor=None,
          commit_rows: int = 512) -> StageReport:
    """Embed the samples matching ``where`` (SQL over ``facts``) that have no vector yet for
    (model, modality); returns the run's report (``written``: the vectors written)."""
    stage = EmbedStage(model, modality, device, batch_size, encoder)
    return run_stage(store, stage, where, executor=executor, progress=progress, commit_rows=commit_rows,
                     config={"where": where})


def _vectors(rows: np.ndarray) -> pa.FixedSizeListArray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def load_vectors(store: Store, model: str, modality: str, ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(sample ids, (N, d) array) of one model's vectors, in id order (only ``ids`` if given)."""
    table = store.arrow("embeddings", ["sample_id", "vector"], modality=modality, model=model)
    if len(table) == 0:
        raise LookupError(f"no {modality} embeddings from model {model!r}; run `engine embed --model {model} --modality {modality}`")
    table = table.sort_by("sample_id")
    if ids is not None:
        table = table.filter(pc.is_in(table.column("sample_id"), pa.array(ids)))
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("sample_id").to_pylist(), flat.reshape(len(table), -1).astype(np.float32)


def pca_fit(train: np.ndarray, components: int, standardize: bool = True) -> dict[str, np.ndarray]:
    """PCA (via SVD) of the train rows; ``scale`` makes each component unit-variance when standardising."""
    mean = train.mean(0)
    _, _, basis = np.linalg.svd(train - mean, full_matrices=False)
    basis = basis[:components]
    scale = ((train - mean) @ basis.T).std(0) if standardize else np.ones(components)
    return {"mean": mean, "basis": basis, "scale": np.maximum(scale, 1e-12)}


def pca_apply(x: np.ndarray, transform: dict[str, np.ndarray]) -> np.ndarray:
    return (((x - transform["mean"]) @ transform["basis"].T) / transform["scale"]).astype(np.float32)


def transform_folder(store: Store, model: str, modality: str) -> Path:
    """Where the transforms of a transformed model (its fits, one file per fit run) are kept."""
    key = {"modality": modality, "model": model}
    return store.root / "transforms" / partition_table_name(store.spec("embeddings"), key)


def load_transform(store: Store, model: str, modality: str) -> tuple[str, dict[str, np.ndarray]]:
    """The fit run and the transform that made a transformed model's vectors now in the store."""
    runs = pc.unique(store.arrow("embeddings", ["run_id"], modality=modality, model=model).column("run_id")).to_pylist()
    if len(runs) != 1:
        raise LookupError(f"{modality} model {model!r}: expected the vectors of one fit, found runs {runs}")
    with np.load(transform_folder(store, model, modality) / f"{runs[0]}.npz") as saved:
        return runs[0], {key: saved[key] for key in saved.files}


def fit_pca(store: Store, model: str, modality: str, components: int, standardize: bool = True,
            train_where: str = "split = 'train'") -> str:
    """Fit PCA (on the train split) to a model's vectors and store every transformed vector under a new
    model name, replacing that model's vectors in one commit, so that all of them come from this fit.
    The transform is saved first, as ``transforms/{table}/{run_id}.npz`` with the fit's run id, which
    every new row carries. Returns the new model name."""
    started = dt.datetime.now(dt.timezone.utc)
    ids, vectors = load_vectors(store, model, modality)
    con, _ = store.connect()
    check_where(con, train_where, "samples", "train split filter")
    train_ids = {r[0] for r in con.execute(f"select sample_id from samples where {train_where}").fetchall()}
    train = np.array([sid in train_ids for sid in ids])
    if train.sum() <= components:
        raise ValueError(f"PCA to {components} dimensions needs more than {components} train rows, found {int(train.sum())}")
    transform = pca_fit(vectors[train], components, standardize)
    projected = pca_apply(vectors, transform)
    name = f"{model}|pca{components}" + ("|std" if standardize else "")
    run_id = new_run_id("embed")
    config = {"model": name, "source_model": model, "modality": modality, "components": components,
              "standardize": standardize, "fit_on": train_where, "train_rows": int(train.sum())}
    folder = transform_folder(store, name, modality)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{run_id}.npz", **transform)
    (folder / f"{run_id}.json").write_text(json.dumps({**config, "run_id": run_id}, indent=2))
    store.overwrite("embeddings", pa.table({
        "sample_id": pa.array(ids, pa.string()), "model": pa.array([name] * len(ids), pa.string()),
        "modality": pa.array([modality] * len(ids), pa.string()), "vector": _vectors(projected),
        "run_id": pa.array([run_id] * len(ids), pa.string()),
    }))
    store.record_run(run_id, "embed", config, started, len(ids))
    return name
