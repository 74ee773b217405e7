"""Modality attribution (``engine attribute``): a training-free partial information decomposition of what a
VLM's internal representation takes from the image and from the text, per layer."""

from engine.attribution.estimate import Attribution, attribute_labels, attribute_representations, discretise, kmeans
from engine.attribution.pid import PIDTerms, broja_pid

__all__ = ["Attribution", "PIDTerms", "attribute_labels", "attribute_representations", "broja_pid", "discretise", "kmeans"]
