"""Perturbed variants of a sample (Diagnosing and Mitigating Modality Interference, §3-4; App. D):

- image-heavy questions get misleading text: unrelated facts (``unrelated_facts``) or a misleading
  description (``misleading``: "The picture seems to describe a {wrong option}. {facts about it}");
- text-heavy questions get an irrelevant image: ``random_pixels``, ``black``, ``white`` canvases of the
  original's size, or a real image from another subset (``irrelevant_image``).

Every choice (facts, wrong option, donor image, noise) comes from salted SHA-256 of the sample id, so
rebuilds are byte-identical.
"""

from __future__ import annotations

import io
from functools import cache

from PIL import Image

from engine.hashing import hash_u64
from engine.options import alternatives, question_options
from engine.paths import RECIPES_DIR, load_yaml
from engine.perturb.image import canvas

TEXT_PERTURBATIONS = ("unrelated_facts", "misleading")
IMAGE_PERTURBATIONS = ("random_pixels", "black", "white", "irrelevant_image")


@cache
def fact_pool() -> dict:
    return load_yaml(RECIPES_DIR / "facts.yaml")


def _choose(options: list, salt: str, sample_id: str, k: int = 1) -> list:
    """k distinct items of ``options``, ranked by salted hash (deterministic)."""
    ranked = sorted(range(len(options)), key=lambda i: hash_u64(f"{salt}:{i}:", sample_id))
    return [options[i] for i in ranked[:k]]


def unrelated_facts(text: str, sample_id: str, facts: int = 3, salt: str = "perturb") -> str:
    """Prepend ``facts`` sentences from the unrelated-fact pool."""
    chosen = _choose(fact_pool()["unrelated"], f"{salt}:facts", sample_id, facts)
    return " ".join(chosen) + " " + text


def wrong_option(question: str, answer: str, label: str | None, labels: list[str], answers: list[str],
                 sample_id: str, salt: str = "perturb") -> str | None:
    """Another option of the sample: another offered choice, another label of its subset, or another
    answer seen in its subset (in that order of preference)."""
    kind, candidates = alternatives(question, answer, label, labels, answers)
    if kind == "option":  # a misleading description names the option's text, not its letter
        options = question_options(question)
        candidates = [options[letter] for letter in candidates if options[letter]]
    return _choose(candidates, f"{salt}:wrong", sample_id)[0] if candidates else None


def subset_options(con) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per subset, the labels and up to 200 answers (the same 200 every time: lowest MD5) that wrong options
    are drawn from. ``con`` is a store connection (``Store.connect``)."""
    labels = dict(con.execute(
        "select subset, list(distinct label order by label) filter (label is not null) from samples group by subset"
    ).fetchall())
    answers = dict(con.execute(
        """select subset, list(answer order by answer) from (
            select distinct subset, turns[1].assistant as answer from samples
            qualify row_number() over (partition by subset order by md5(answer), answer) <= 200)
        group by subset"""
    ).fetchall())
    return {k: v or [] for k, v in labels.items()}, answers


def misleading(text: str, wrong: str, sample_id: str, facts: int = 1, salt: str = "perturb",
               model_facts: dict[str, list[str]] | None = None) -> str:
    """"The picture seems to describe a {wrong}. {facts about it}" before the question. Facts come from
    ``model_facts`` (option -> a model's facts, see ``engine facts``) when it has some for the option, else
    from the shipped pool."""
    about = (model_facts or {}).get(str(wrong).lower()) or fact_pool()["about"].get(str(wrong).lower(), [])
    lead = f"The picture seems to describe a {wrong}."
    extra = _choose(about, f"{salt}:about", sample_id, facts) if about else []
    return " ".join([lead, *extra, text])


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def replacement_image(kind: str, original: bytes, sample_id: str, donors: list[tuple[str, bytes]], subset: str,
                      salt: str = "perturb") -> bytes | None:
    """The image a text-heavy variant shows instead of its own."""
    if kind == "irrelevant_image":
        others = [image for donor_subset, image in donors if donor_subset != subset]
        return _choose(others, f"{salt}:donor", sample_id)[0] if others else None
    width, height = image_size(original)
    return canvas(kind, width, height, seed=hash_u64(f"{salt}:pixels:", sample_id))
