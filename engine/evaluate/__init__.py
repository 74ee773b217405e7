"""``engine eval``: robustness of a VLM to corrupted, misleading and irrelevant inputs."""

from engine.evaluate.metrics import causal_effect, consistency, delta_p, diagnose, is_correct, normalise
from engine.evaluate.run import INTERFERENCE, EvalConfig, evaluate, load_items, summarise

__all__ = ["INTERFERENCE", "EvalConfig", "causal_effect", "consistency", "delta_p", "diagnose", "evaluate", "is_correct",
           "load_items", "normalise", "summarise"]
