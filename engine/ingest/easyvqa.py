"""easy-vqa (PyPI): 64x64 images of one coloured shape, template questions, 13 answer classes.
One row per question; the answer class is the row's ``label``, which makes it a real discrete-label
dataset for the interaction estimator. Ingesting it also loads a caption per row composed from the package's
own annotations of its image (colour and shape, read off the answers; captioner ``easy-vqa-annotations``), so
caption-injecting recipes run on easy-vqa without a captioning model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

from engine.ingest.source import RawRow, Shard, Source

SPLITS = ("train", "test")
CAPTIONER = "easy-vqa-annotations"
PROMPT_ID = "annotations"


@cache
def _image_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def questions(split: str) -> tuple[list[str], list[str], list[int]]:
    """The split's (questions, answers, image ids), in the package's order."""
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"easy-vqa has splits {SPLITS}, not {split!r}")
    return easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()


def image_paths(split: str) -> dict[int, str]:
    import easy_vqa

    return easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()


_COLOR_QUESTION = re.compile(r"^what (color is|is the color of) the ")
_SHAPE_QUESTION = re.compile(r"^what (shape|is the \w+ shape)")


def image_annotations(split: str) -> dict[int, tuple[str, str]]:
    """(colour, shape) of each image, read off the answers to its colour and shape questions."""
    colors: dict[int, str] = {}
    shapes: dict[int, str] = {}
    for question, answer, image in zip(*questions(split)):
        if _COLOR_QUESTION.match(question):
            colors[image] = answer
        elif _SHAPE_QUESTION.match(question):
            shapes[image] = answer
    return {image: (colors[image], shapes[image]) for image in colors.keys() & shapes.keys()}


def annotation_caption(color: str, shape: str) -> str:
    """The caption an image's annotations compose."""
    return f"A single {color} {shape} drawn on a plain light background."


class EasyVQASource(Source):
    """All questions of the chosen easy-vqa splits, as subset ``easy_vqa``."""

    name = "easy_vqa"
    captioner = CAPTIONER
    caption_prompt_id = PROMPT_ID

    def __init__(self, splits: tuple[str, ...] = SPLITS, limit: int | None = None):
        self.splits = splits
        self.limit = limit

    def total(self) -> int:
        return sum(self._rows(split) for split in self.splits)

    def _rows(self, split: str) -> int:
        return min(len(questions(split)[0]), 10**18 if self.limit is None else self.limit)

    def shards(self) -> list[Shard]:
        """One shard per split."""
        return [Shard(EasyVQASource((split,), self.limit), f"{self.name}:easy_vqa:{split}:", 0, self._rows(split))
                for split in self.splits]

    def config(self) -> dict:
        return {"source": self.name, "splits": list(self.splits), "limit": self.limit}

    def rows(self) -> Iterator[RawRow]:
        for split in self.splits:
            paths = image_paths(split)
            qs, answers, images = questions(split)
            for row, (question, answer, image) in enumerate(zip(qs, answers, images)):
                if self.limit is not None and row >= self.limit:
                    break
                yield RawRow(
                    subset="easy_vqa",
                    split=split,
                    row=row,
                    images=[_image_bytes(paths[image])],
                    texts=[{"user": question, "assistant": answer, "source": "easy_vqa"}],
                    label=answer,
                )

    def captions(self) -> Iterator[tuple[str, str]]:
        """Each question row's caption, from its image's annotations (rows whose image lacks one get none)."""
        for split in self.splits:
            annotations = image_annotations(split)
            for row, image in enumerate(questions(split)[2]):
                if self.limit is not None and row >= self.limit:
                    break
                if image in annotations:
                    yield f"{self.name}:easy_vqa:{split}:{row}", annotation_caption(*annotations[image])
