"""Perturbations: image and text corruptions at severities 1-5, and the perturbed variants of modality
interference (misleading text on image-heavy questions, irrelevant images on text-heavy ones)."""
