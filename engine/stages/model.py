"""What the model-driven stages share (caption, validate, corrupt's rewrites): a backend loaded once per
worker, images decoded per batch (a broken one rejected), prompts that do not fit the model rejected by the
one rule (``engine.models.backends.run_fitting``), and the seconds spent in the model and its processor."""

from __future__ import annotations

import pyarrow as pa

from engine.models.backends import Backend, BackendSpec, Request, run_fitting
from engine.stages.base import Needs, Stage, StageOutput, decode_rows, reject


class ModelStage(Stage):
    """A per-sample stage around a backend. Subclasses implement ``request(row, images)`` (the prompt) and
    ``compute(rows, requests)`` (one output row per input row, calling the backend)."""

    reads = ("images",)
    batch_rows = 8

    def __init__(self, backend: Backend | BackendSpec, batch_rows: int = 8):
        """``backend``: a loaded backend (runs in this process) or a ``BackendSpec`` (each worker loads it)."""
        self.backend, self.spec = (None, backend) if isinstance(backend, BackendSpec) else (backend, None)
        self.model_name = backend.name
        self.batch_rows = batch_rows
        device = self.spec.device if self.spec else getattr(backend, "device", "cpu")
        gpu = str(device).startswith("cuda")
        self.needs = Needs(device="gpu" if gpu else "cpu", gpus=1.0 if gpu else 0.0, model=self.model_name)

    def __getstate__(self) -> dict:
        if self.spec is None:
            raise TypeError(f"stage {self.name} holds a loaded backend; give it a BackendSpec to run it on other workers")
        return {**self.__dict__, "backend": None}

    def setup(self) -> None:
        if self.backend is None:
            self.backend = self.spec.load()

    def request(self, row: dict, images: list) -> Request:
        raise NotImplementedError(f"{type(self).__name__} must define request(row, images): the prompt of one row")

    def compute(self, rows: list[dict], requests: list[Request]) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} must define compute(rows, requests): one output row per row")

    def process(self, batch: pa.Table) -> StageOutput:
        rows, images, rejects = decode_rows(batch)
        requests = [self.request(row, decoded) for row, decoded in zip(rows, images)]
        model, processor = self.backend.model_seconds, self.backend.prepare_seconds
        results, _, dropped = run_fitting(
            lambda fit: self.compute([rows[i] for i in fit], [requests[i] for i in fit]), list(range(len(rows))))
        rejects += [reject(rows[index]["sample_id"], reason) for index, reason in sorted(dropped.items())]
        seconds = {"model": self.backend.model_seconds - model, "processor": self.backend.prepare_seconds - processor}
        return StageOutput(pa.Table.from_pylist(results) if results else None, rejects, seconds=seconds)

