"""Model-driven columns: captions (``engine caption``), perplexity self-validation (``engine validate``),
corruption flags (``engine corrupt``) and facts for misleading descriptions (``engine facts``), through one
backend interface (transformers or vLLM)."""

from engine.generate.backends import Backend, Generation, Request, TransformersBackend, load_backend, perplexity
from engine.generate.caption import caption
from engine.generate.corrupt import corrupt
from engine.generate.facts import write_facts
from engine.generate.validate import precision_recall, validate, validation_report

__all__ = ["Backend", "Generation", "Request", "TransformersBackend", "caption", "corrupt", "load_backend",
           "perplexity", "precision_recall", "validate", "validation_report", "write_facts"]
